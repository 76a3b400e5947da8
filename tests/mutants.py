"""Seeded mutants of real image files (JPEG, PNG, WebP, TIFF, BMP) for the reader fuzz tests.

`seed_files()` writes small real files of the five formats from synthetic images; `mutant(data, rng)` returns one
hostile variant of a file's bytes and the name of the mutation: byte flips, truncations, header-field edits (zero or
huge widths and heights), duplicated chunks, zeroed runs, splices of two formats, trailing garbage.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from synthetic import make_image

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP"}
HUGE = (0, 1, 0xFFFF, 0x7FFF, 0xFFFFFFFF, 0x7FFFFFFF, 100_000)


def seed_files(n_per_format: int = 2, size: int = 48, seed: int = 0) -> dict[str, bytes]:
    """{name.ext: bytes}: real files of every format, a few modes (RGB, L, RGBA, P, 16-bit) among them."""
    rng = np.random.default_rng(seed)
    out: dict[str, bytes] = {}
    for i in range(n_per_format):
        img, _, _ = make_image(rng, size)
        img = img.crop((0, 0, size, size - 8 * i))  # not square: width and height differ
        for ext, fmt in FORMATS.items():
            variants = {"rgb": img}
            if i == 1:
                variants = {"l": img.convert("L"), "rgba": img.convert("RGBA")}
                if fmt in ("PNG", "BMP", "TIFF"):
                    variants["p"] = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
                if fmt in ("PNG", "TIFF"):
                    variants["i16"] = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
            for mode, im in variants.items():
                buf = io.BytesIO()
                kwargs = {"quality": 80} if fmt in ("JPEG", "WEBP") else {}
                if fmt == "JPEG" and mode == "rgba":
                    im = im.convert("CMYK")
                if fmt == "TIFF" and i == 1 and mode == "rgb":
                    kwargs = {"compression": "tiff_deflate"}
                im.save(buf, fmt, **kwargs)
                out[f"seed{i}_{mode}.{ext}"] = buf.getvalue()
    return out


# -- header fields ---------------------------------------------------------------------------------------------
def _size_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of width and height fields in the header, where the format is known."""
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        return [(16, ">I"), (20, ">I")]
    if data.startswith(b"BM") and len(data) >= 26:
        return [(18, "<i"), (22, "<i")]
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                break
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2):
                return [(i + 5, ">H"), (i + 7, ">H")]
            i += 2 + length
        return []
    if data.startswith(b"RIFF") and data[12:16] == b"VP8 " and len(data) >= 30:
        return [(26, "<H"), (28, "<H")]
    if data.startswith(b"RIFF") and data[12:16] == b"VP8X" and len(data) >= 30:
        return [(24, "<I"), (27, "<I")]  # 24-bit fields: written as 32 bits, the next byte overlaps
    if data[:4] in (b"II*\0", b"MM\0*"):
        end = "<" if data[:2] == b"II" else ">"
        try:
            ifd = struct.unpack(end + "I", data[4:8])[0]
            n = struct.unpack(end + "H", data[ifd:ifd + 2])[0]
            found = []
            for k in range(n):
                e = ifd + 2 + 12 * k
                tag, kind = struct.unpack(end + "HH", data[e:e + 4])
                if tag in (256, 257):
                    found.append((e + 8, end + ("H" if kind == 3 else "I")))
            return found
        except struct.error:
            return []
    return []


def _set_field(data: bytearray, off: int, fmt: str, value: int) -> None:
    width = struct.calcsize(fmt)
    if off + width > len(data):
        return
    bits = 8 * width
    signed = fmt[-1].islower()
    v = value % (1 << bits)
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    if fmt[-1] == "I" and fmt[0] == "<" and off >= 24 and data[:4] == b"RIFF":  # VP8X: 24 bits
        data[off:off + 3] = (value % (1 << 24)).to_bytes(3, "little")
        return
    data[off:off + width] = struct.pack(fmt, v)


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each PNG chunk after the signature."""
    spans, i = [], 8
    while i + 12 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        end = i + 12 + n
        if end > len(data):
            break
        spans.append((i, end))
        i = end
    return spans


# -- mutations -------------------------------------------------------------------------------------------------
def flip_bytes(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
    return bytes(b)


def flip_header(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(0, min(len(b), 64)))
        b[pos] = int(rng.integers(0, 256))
    return bytes(b)


def truncate(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def size_field(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    fields = _size_fields(data)
    if not fields:
        return flip_header(data, rng, other)
    b = bytearray(data)
    for off, fmt in fields:
        if rng.random() < 0.7:
            _set_field(b, off, fmt, int(rng.choice(HUGE)) if rng.random() < 0.8 else -int(rng.integers(1, 1000)))
    if data.startswith(b"\x89PNG") and rng.random() < 0.7:  # a right CRC, so the header passes its check
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def duplicate_chunk(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    if data.startswith(b"\x89PNG"):
        spans = _png_chunks(data)
        if spans:
            s, e = spans[int(rng.integers(0, len(spans)))]
            return data[:e] + data[s:e] * int(rng.integers(1, 4)) + data[e:]
    s = int(rng.integers(0, len(data)))
    e = min(len(data), s + int(rng.integers(1, 512)))
    return data[:e] + data[s:e] * int(rng.integers(1, 4)) + data[e:]


def zero_run(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    s = int(rng.integers(0, len(data)))
    n = int(rng.integers(1, max(2, len(data) // 4)))
    fill = b"\xff" if rng.random() < 0.3 else b"\0"
    return data[:s] + fill * min(n, len(data) - s) + data[s + n:]


def splice(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    a = int(rng.integers(1, len(data)))
    b = int(rng.integers(0, len(other)))
    return data[:a] + other[b:]


def trailing_garbage(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    n = int(rng.integers(1, 4096))
    tail = rng.integers(0, 256, n, dtype=np.uint8).tobytes() if rng.random() < 0.5 else other[: n]
    return data + tail


def insert_bytes(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    s = int(rng.integers(0, len(data)))
    return data[:s] + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes() + data[s:]


MUTATIONS = {f.__name__: f for f in (flip_bytes, flip_header, truncate, size_field, duplicate_chunk, zero_run,
                                     splice, trailing_garbage, insert_bytes)}


def mutant(data: bytes, rng: np.random.Generator, other: bytes) -> tuple[bytes, str]:
    """One mutant of `data` (`other`: a file of another format, for splices), and the mutations applied."""
    names = list(MUTATIONS)
    chosen = [names[int(rng.integers(0, len(names)))] for _ in range(1 if rng.random() < 0.7 else 2)]
    for name in chosen:
        if len(data) < 2:
            break
        data = MUTATIONS[name](data, rng, other)
    return data, "+".join(chosen)


def mutants(seeds: dict[str, bytes], n: int, seed: int = 0):
    """n (file name, bytes, mutation) triples, cycling over the seed files; the same n and seed give the same files."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds)
    for k in range(n):
        name = names[k % len(names)]
        ext = name.rsplit(".", 1)[1]
        other = seeds[names[int(rng.integers(0, len(names)))]]
        data, how = mutant(seeds[name], rng, other)
        yield f"m{k:05d}_{name.rsplit('.', 1)[0]}.{ext}", data, how
