"""Accuracy against retained visual tokens, drawn with Pillow (a dependency already; matplotlib is not).

One panel per series of questions (overall, and the fine questions by default): each method is a
coloured line through its budgets, random shows its seed spread as a vertical bar, and the unpruned
model is a dashed horizontal line at its accuracy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = {
    "random": (150, 150, 150), "avgpool": (31, 119, 180), "visionzip": (44, 160, 44),
    "drop-clip": (188, 189, 34), "drop-convnext": (140, 86, 75), "fastv": (148, 103, 189),
    "meteor-s1": (255, 152, 150), "meteor-s2": (255, 127, 14), "meteor-s3": (227, 119, 194),
    "meteor": (214, 39, 40),
}
W, H = 560, 420
MARGIN = (64, 36, 20, 52)  # left, top, right, bottom


def _font():
    return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, series: Dict[str, List[Tuple[float, float, float, float]]],
           unpruned: Optional[float], x_max: float) -> None:
    """series: method -> [(tokens, accuracy, low, high)] sorted by tokens."""
    left, top, right, bottom = MARGIN
    px0, py0, px1, py1 = x0 + left, top, x0 + W - right, H - bottom
    font = _font()

    def to_xy(t: float, a: float) -> Tuple[float, float]:
        return px0 + (px1 - px0) * t / x_max, py1 - (py1 - py0) * a

    draw.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    for i in range(11):  # accuracy grid every 0.1
        y = py1 - (py1 - py0) * i / 10
        draw.line([px0, y, px1, y], fill=(232, 232, 232))
        draw.text((px0 - 30, y - 6), f"{i / 10:.1f}", fill=(0, 0, 0), font=font)
    step = 16 if x_max <= 160 else 32
    t = 0
    while t <= x_max:
        x = to_xy(t, 0)[0]
        draw.line([x, py1, x, py1 + 4], fill=(0, 0, 0))
        draw.text((x - 8, py1 + 6), str(t), fill=(0, 0, 0), font=font)
        t += step
    draw.text((px0 + (px1 - px0) // 2 - 80, H - 22), "visual tokens retained (mean)", fill=(0, 0, 0), font=font)
    draw.text((px0, 10), title, fill=(0, 0, 0), font=font)
    if unpruned is not None:
        y = to_xy(0, unpruned)[1]
        for xs in range(px0, px1, 10):
            draw.line([xs, y, min(xs + 5, px1), y], fill=(0, 0, 0))
        draw.text((px1 - 120, y - 14), f"unpruned {unpruned:.3f}", fill=(0, 0, 0), font=font)
    for method, points in series.items():
        colour = PALETTE.get(method, (0, 0, 0))
        xy = [to_xy(t, a) for t, a, _, _ in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3 if method == "meteor" else 2)
        for (t, a, lo, hi), (x, y) in zip(points, xy):
            if hi > lo:
                draw.line([x, to_xy(t, lo)[1], x, to_xy(t, hi)[1]], fill=colour, width=2)
            r = 4 if method == "meteor" else 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def draw(rows: Sequence[Dict[str, object]], path: str, panels: Sequence[Tuple[str, str]] = (
        ("overall", "overall accuracy"), ("fine", "fine questions (digit, next_to_digit)"))) -> str:
    """Write the plot of ``rows`` (the benchmark's summary rows: method, kept, accuracy {series: value},
    low/high {series: value} for seeded methods) to ``path`` (PNG); returns ``path``."""
    x_max = max(float(r["kept"]) for r in rows)
    x_max = 16 * (int(x_max) // 16 + 1)
    legend_h = 24
    img = Image.new("RGB", (W * len(panels), H + legend_h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for p, (key, title) in enumerate(panels):
        series: Dict[str, List[Tuple[float, float, float, float]]] = {}
        unpruned = None
        for r in rows:
            acc = r["accuracy"][key]
            if r["method"] == "unpruned":
                unpruned = acc
                continue
            lo = r.get("low", {}).get(key, acc)
            hi = r.get("high", {}).get(key, acc)
            series.setdefault(str(r["method"]), []).append((float(r["kept"]), acc, lo, hi))
        for points in series.values():
            points.sort()
        _panel(d, p * W, title, series, unpruned, x_max)
    x = 10
    font = _font()
    for method, colour in PALETTE.items():
        if not any(r["method"] == method for r in rows):
            continue
        d.rectangle([x, H + 8, x + 12, H + 18], fill=colour)
        d.text((x + 16, H + 6), method, fill=(0, 0, 0), font=font)
        x += 20 + int(d.textlength(method, font=font)) + 14
    img.save(path)
    return path
