"""Synthetic images with one known object: textured background, a shape of random colour, size and place."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(rng: np.random.Generator, size: int = 96) -> tuple[Image.Image, list[int], np.ndarray]:
    """One image, its object box [x1, y1, x2, y2] (inclusive) and its 0/255 object mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(60, 200, size=3)
    f1, f2 = rng.uniform(0.15, 0.6, size=2)
    phase = rng.uniform(0, 6.3, size=3)
    texture = np.stack([np.sin(f1 * xx + phase[c]) * np.cos(f2 * yy + phase[c]) for c in range(3)], -1)
    noise = rng.normal(0, 12, size=(size, size, 3))
    bg = np.clip(base + 35 * texture + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    mask = Image.new("L", (size, size), 0)
    w = int(rng.integers(size // 4, size // 2 + 1))
    h = int(rng.integers(size // 4, size // 2 + 1))
    x1 = int(rng.integers(0, size - w))
    y1 = int(rng.integers(0, size - h))
    box = [x1, y1, x1 + w - 1, y1 + h - 1]
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    shape = int(rng.integers(0, 2))
    for draw, fill in ((ImageDraw.Draw(img), colour), (ImageDraw.Draw(mask), 255)):
        (draw.ellipse if shape else draw.rectangle)(box, fill=fill)
    return img, box, np.asarray(mask)


def make_folder(root: Path, n: int, seed: int = 0, size: int = 96, subdirs: bool = False) -> dict[str, list[int]]:
    """Write n synthetic JPEG/PNG images under root; returns relative path -> ground-truth box."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for i in range(n):
        img, box, _ = make_image(rng, size)
        rel = f"{'sub%d/' % (i % 2) if subdirs else ''}img_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=95) if rel.endswith("jpg") else img.save(root / rel)
        boxes[rel] = box
    return boxes
