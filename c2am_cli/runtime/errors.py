"""The one error type users see: a single line naming the file and the reason."""


class C2AMError(Exception):
    """A user-facing failure (bad argument, unreadable file, wrong weights); no traceback needed."""


class ImageError(C2AMError):
    """An input image that cannot be used; the batch job reports it and goes on."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DiskFull(C2AMError):
    """An output could not be written for want of space: a batch job stops here (the finished part is kept)."""
