"""Size checks on .npy / .npz files before NumPy allocates what their headers claim.

np.load allocates the array a header describes before it reads the data, so a 128-byte file claiming
(100000, 100000) float32 asks for 37 GiB. The header is read here first; a claim beyond what the file holds (or
beyond MAX_ARRAY_BYTES) is refused with one line.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..runtime.errors import C2AMError

MAX_ARRAY_BYTES = 4 << 30  # 4 GiB: 20 class maps of 7000 x 7000 float32; no CAM, cue or map file needs more


def _claimed(f) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) from a .npy header at the file position, or None when it is not a readable header (np.load
    then says why)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, dtype
    except Exception:
        return None


def _check(path, what: str, shape, dtype, holds: int) -> None:
    if dtype.hasobject:
        return  # object arrays are refused (or unpickled when trusted) by np.load itself
    claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if claimed > min(holds, MAX_ARRAY_BYTES):
        raise C2AMError(f"{path}: {what}claims a {'x'.join(map(str, shape))} {dtype} array ({claimed / 2**20:.6g} MiB) "
                        f"but holds {holds} bytes of data (truncated, or a hostile header)")


def check_npy_sizes(path: str | Path) -> None:
    """Refuse a .npy (or an .npz, by its members) whose header claims more data than the file holds."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"PK":
                f.seek(0)
                with zipfile.ZipFile(f) as z:
                    for info in z.infolist():
                        with z.open(info) as member:
                            claim = _claimed(member)
                            if claim is not None:
                                _check(path, f"{info.filename} ", *claim, holds=info.file_size)
                return
            f.seek(0)
            claim = _claimed(f)
            if claim is not None:
                _check(path, "", *claim, holds=max(0, path.stat().st_size - f.tell()))
    except C2AMError:
        raise
    except Exception:
        return  # not a NumPy file: np.load says why
