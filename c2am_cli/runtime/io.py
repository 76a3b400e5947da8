"""Atomic writes and the small file formats c2am writes (JSON, JSON Lines, PNG, NPY)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .errors import C2AMError, DiskFull

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise C2AMError(f"{path}: cannot write ({why_not_written(e)})") from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and writers that recreate it) make 0600 files
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only folder, a folder in the way: one clear line, not a traceback
        why = why_not_written(e, path.parent)
        raise (DiskFull if why.startswith("disk full") else C2AMError)(f"{path}: cannot write ({why})") from e
    except Exception as e:  # writers that wrap the OS error in their own type (safetensors): still one line
        if "No space left" not in str(e) and "StorageFull" not in str(e):
            raise
        raise DiskFull(f"{path}: cannot write ({why_not_written(OSError(errno.ENOSPC, 'No space left on device'))})") from e
    finally:
        tmp.unlink(missing_ok=True)


def why_not_written(e: OSError, folder: Path | None = None) -> str:
    """The reason for a failed write; a short write without an errno (NumPy's "N requested and M written") on a
    folder with next to no space left is a full disk too."""
    short = False
    if e.errno is None and folder is not None:
        try:
            st = os.statvfs(folder)
            short = st.f_bavail * st.f_frsize < (256 << 10)
        except OSError:
            pass
    if short or e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full: No space left on device; free space or move the output, then rerun to resume"
    return str(e.strerror or e)


_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what atomic_path's mkstemp names look like


def remove_stale_temps(folder: str | Path, name: str = "*", recursive: bool = True) -> int:
    """Delete the temporary files a killed run left for outputs named `name` (a glob) under `folder`; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f".{name}.*.tmp"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    stale = [p for p in found if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def dumps(obj: Any, indent: int | None = None) -> str:
    """JSON that is valid UTF-8: non-ASCII kept readable, except undecodable file names (lone surrogates), escaped."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent, ensure_ascii=True)
    return text


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, dumps(obj, indent=indent) + "\n")


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """A compressed .npz of plain arrays (readable with allow_pickle=False), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def save_png_atomic(path: str | Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


class JsonLines:
    """An append-only JSON Lines file, flushed per record, that survives a kill mid-line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = None

    def read(self) -> list[dict]:
        """All complete records; a torn last line (the run was killed while writing it) is dropped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():  # bytes: a torn line may end inside a UTF-8 character
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
        return records

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: list[dict]) -> None:
        """Append records with one flush and fsync (a kill tears at most the last line, which read() drops)."""
        if not records:
            return
        if self._f is None:
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._f = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._f.write("\n")
        self._f.write("".join(dumps(record) + "\n" for record in records))
        self._f.flush()
        os.fsync(self._f.fileno())

    def reset(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
