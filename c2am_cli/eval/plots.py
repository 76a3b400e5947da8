"""The curves of a `c2am eval` report as a PNG (--plot)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..runtime.errors import C2AMError

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_curves(report, path, size: tuple[int, int] = (900, 560)) -> None:
    """Accuracy / IoU (%) against tau, one line per curve, the chosen taus marked; a PNG drawn with Pillow."""
    from ..runtime.io import save_png_atomic

    curves = report.curves
    if "tau" not in curves:
        raise C2AMError("--plot: these results have no threshold curve (pseudo-masks are scored without one)")
    names = [k for k in ("BoxAcc@50", "BoxAccV2@30", "BoxAccV2@50", "BoxAccV2@70", "CorLoc", "mIoU", "dsIoU",
                         "fgIoU", "bgIoU", "mIoU2", "F@tau") if k in curves]
    w, h = size
    left, right, top, bottom = 64, 190, 36, 52
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = left, w - right, top, h - bottom
    X = lambda t: x0 + (x1 - x0) * t  # noqa: E731
    Y = lambda v: y1 - (y1 - y0) * v / 100  # noqa: E731
    for v in range(0, 101, 10):
        draw.line([(x0, Y(v)), (x1, Y(v))], fill=(230, 230, 230))
        draw.text((x0 - 30, Y(v) - 6), f"{v:3d}", fill="black", font=font)
    for i in range(0, 11):
        t = i / 10
        draw.line([(X(t), y0), (X(t), y1)], fill=(240, 240, 240))
        draw.text((X(t) - 8, y1 + 6), f"{t:.1f}", fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2 - 80, h - 22), "threshold tau (relative to each map's max)", fill="black", font=font)
    d = report.header
    src = d["source"]
    what = src.get("baseline") or src.get("folder") or src.get("weights") or ""
    draw.text((x0, 10), f"c2am eval: {d['dataset']} {Path(d['root']).name} - {src.get('kind')} {what} - "
                        f"{d['images']['evaluated']} images - accuracy / IoU (%)", fill="black", font=font)
    taus = curves["tau"]
    for n, name in enumerate(names):
        colour = _COLOURS[n % len(_COLOURS)]
        pts = [(X(t), Y(v)) for t, v in zip(taus, curves[name]) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        ly = y0 + 18 * n
        draw.line([(x1 + 12, ly + 6), (x1 + 36, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 42, ly), name, fill="black", font=font)
    chosen = report.extra.get("tau", {})
    for t in sorted(set(v for v in chosen.values() if v is not None)):
        for yy in range(int(y0), int(y1), 8):
            draw.line([(X(t), yy), (X(t), min(yy + 4, y1))], fill=(90, 90, 90))
    if chosen:
        draw.text((x1 + 12, y0 + 18 * len(names) + 12), "dashed: tau used", fill="black", font=font)
    save_png_atomic(path, img)
