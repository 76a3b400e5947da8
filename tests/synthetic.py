"""Synthetic images with one known object: textured background, a shape of random colour, size and place."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(rng: np.random.Generator, size: int = 96, salient: bool = False) -> tuple[Image.Image, list[int], np.ndarray]:
    """One image, its object box [x1, y1, x2, y2] (inclusive) and its 0/255 object mask.

    `salient` draws the C2AM premise (foregrounds resemble each other, backgrounds resemble each other) so that a few
    epochs can learn it: a fine, low-saturation texture behind a flat shape of random saturated hue, of random size
    (a third to 0.6 of the side) and place. The default is the harder mix of colourful backgrounds and any colour.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if salient:
        base = rng.uniform(70, 190) + rng.uniform(-20, 20, size=3)  # a grey, slightly tinted
        f1, f2 = rng.uniform(0.5, 1.2, size=2)
        amplitude, sigma = 40, 20
    else:
        base = rng.uniform(60, 200, size=3)
        f1, f2 = rng.uniform(0.15, 0.6, size=2)
        amplitude, sigma = 35, 12
    phase = rng.uniform(0, 6.3, size=3)
    texture = np.stack([np.sin(f1 * xx + phase[c]) * np.cos(f2 * yy + phase[c]) for c in range(3)], -1)
    noise = rng.normal(0, sigma, size=(size, size, 3))
    bg = np.clip(base + amplitude * texture + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    mask = Image.new("L", (size, size), 0)
    lo, hi = (int(size * 0.33), int(size * 0.6)) if salient else (size // 4, size // 2)
    w = int(rng.integers(lo, hi + 1))
    h = int(rng.integers(lo, hi + 1))
    x1 = int(rng.integers(0, size - w))
    y1 = int(rng.integers(0, size - h))
    box = [x1, y1, x1 + w - 1, y1 + h - 1]
    if salient:
        hsv = rng.uniform(0, 1), rng.uniform(0.7, 1), rng.uniform(0.6, 1)
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(*hsv))
    else:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    shape = int(rng.integers(0, 2))
    for draw, fill in ((ImageDraw.Draw(img), colour), (ImageDraw.Draw(mask), 255)):
        (draw.ellipse if shape else draw.rectangle)(box, fill=fill)
    return img, box, np.asarray(mask)


def make_folder(root: Path, n: int, seed: int = 0, size: int = 96, subdirs: bool = False,
                salient: bool = False) -> dict[str, list[int]]:
    """Write n synthetic JPEG/PNG images under root; returns relative path -> ground-truth box."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for i in range(n):
        img, box, _ = make_image(rng, size, salient)
        rel = f"{'sub%d/' % (i % 2) if subdirs else ''}img_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=95) if rel.endswith("jpg") else img.save(root / rel)
        boxes[rel] = box
    return boxes
