"""One run per output: an advisory lock file beside (or in) the output, held for the whole run.

`fcntl.flock` locks belong to the open file, so the kernel drops them when the process ends, however it ends: a run
killed with SIGKILL leaves a lock file behind but never a lock, and the next run takes it at once. A run that ends
removes its lock file.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import C2AMError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None


@contextlib.contextmanager
def output_lock(lock_path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the block; if another process holds it, refuse
    at once with one line naming the lock file and that process's pid."""
    lock_path = Path(lock_path)
    if fcntl is None:
        yield
        return
    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise C2AMError(f"{lock_path}: cannot create the lock file of {what} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                other = "unknown"
            os.close(fd)
            raise C2AMError(f"{what} is in use by another c2am run (pid {other}; lock {lock_path}); "
                            f"wait for it to end, or give another output") from None
        try:  # the file locked is still the one at lock_path (not one a finishing run just removed)?
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:  # the holder's pid, for the message above; a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        try:  # while still holding it, and only if it is still ours (the folder may have vanished and come back)
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)
