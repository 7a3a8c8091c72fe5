"""Accuracy against prefill FLOPs, drawn with Pillow (a dependency already; matplotlib is not).

One panel per series of questions (overall and every kind by default, three to a row): each method is a
coloured line through its budgets at the FLOPs it really spent, random shows its seed spread as a vertical
bar, and the unpruned model is a dashed horizontal line at its accuracy (its FLOPs are the right edge).
Ablation rows (``meteor:NAME``) are left to the text report; FastV run at several layers (``fastv:<layer>``) is
drawn as its frontier over them (at each cost, its most accurate layer).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from .methods import FRONTIERS, frontier

PALETTE = {
    "random": (150, 150, 150), "avgpool": (31, 119, 180), "visionzip": (44, 160, 44),
    "drop-clip": (188, 189, 34), "drop-convnext": (140, 86, 75), "fastv": (148, 103, 189),
    "random+pa": (90, 90, 90), "visionzip+pa": (23, 100, 23), "fastv+pa": (90, 60, 130),
    "meteor-s1": (255, 152, 150), "meteor-s2": (255, 127, 14), "meteor-s3": (227, 119, 194),
    "meteor-s3-fixed": (247, 182, 210), "meteor-fixed": (255, 187, 120), "meteor": (214, 39, 40),
}
W, H = 560, 420
MARGIN = (64, 36, 20, 52)  # left, top, right, bottom


def _layered(row: dict) -> bool:
    """A row of a method run at several layers (``fastv:<layer>``, ``fastv+pa:<layer>``), drawn as its frontier."""
    return str(row["method"]).partition(":")[0] in FRONTIERS


def _font():
    return ImageFont.load_default()


def _ticks(x_max: float) -> List[float]:
    """About five round tick values from 0 to ``x_max``."""
    raw = x_max / 5
    step = min((m * 10 ** e for e in range(-4, 6) for m in (1, 2, 5) if m * 10 ** e >= raw), default=raw)
    return [i * step for i in range(int(x_max / step) + 1)]


def _panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str,
           series: Dict[str, List[Tuple[float, float, float, float]]], unpruned: Optional[float], x_max: float,
           x_label: str) -> None:
    """series: method -> [(x, accuracy, low, high)] sorted by x."""
    left, top, right, bottom = MARGIN
    px0, py0, px1, py1 = x0 + left, y0 + top, x0 + W - right, y0 + H - bottom
    font = _font()

    def to_xy(t: float, a: float) -> Tuple[float, float]:
        return px0 + (px1 - px0) * t / x_max, py1 - (py1 - py0) * a

    draw.rectangle([px0, py0, px1, py1], outline=(0, 0, 0))
    for i in range(11):  # accuracy grid every 0.1
        y = py1 - (py1 - py0) * i / 10
        draw.line([px0, y, px1, y], fill=(232, 232, 232))
        draw.text((px0 - 30, y - 6), f"{i / 10:.1f}", fill=(0, 0, 0), font=font)
    for t in _ticks(x_max):
        x = to_xy(t, 0)[0]
        draw.line([x, py1, x, py1 + 4], fill=(0, 0, 0))
        draw.text((x - 8, py1 + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    draw.text((px0 + (px1 - px0) // 2 - 60, y0 + H - 22), x_label, fill=(0, 0, 0), font=font)
    draw.text((px0, y0 + 10), title, fill=(0, 0, 0), font=font)
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


PANELS = (("overall", "overall"), ("background", "background (global)"), ("colour", "colour (one object)"),
          ("digit", "digit (a small glyph)"), ("count", "count (every object of a colour)"),
          ("needs_tokens", "kinds that need tokens (colour, digit, count)"))


def draw(rows: Sequence[Dict[str, object]], path: str, panels: Sequence[Tuple[str, str]] = PANELS,
         x_key: str = "gflops", x_label: str = "prefill GFLOPs (needed)", columns: int = 3) -> str:
    """Write the plot of ``rows`` (the benchmark's summary rows: method, ``x_key``, accuracy {series: value},
    low/high {series: value} for seeded methods) to ``path`` (PNG); returns ``path``."""
    x_max = max(float(r[x_key]) for r in rows) * 1.05
    legend_h = 24
    n_rows = (len(panels) + columns - 1) // columns
    img = Image.new("RGB", (W * min(columns, len(panels)), H * n_rows + legend_h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for p, (key, title) in enumerate(panels):
        series: Dict[str, List[Tuple[float, float, float, float]]] = {}
        unpruned = None
        for r in rows:
            acc = r["accuracy"][key]
            if r["method"] == "unpruned":
                unpruned = acc
                continue
            method = str(r["method"]).partition(":")[0] if _layered(r) else str(r["method"])  # FastV's layers
            if method not in PALETTE:
                continue
            lo = r.get("low", {}).get(key, acc)
            hi = r.get("high", {}).get(key, acc)
            series.setdefault(method, []).append((float(r[x_key]), acc, lo, hi))
        for method, points in series.items():
            points.sort()
            if any(_layered(r) and str(r["method"]).startswith(method + ":") for r in rows):
                points[:] = frontier(points)
        _panel(d, (p % columns) * W, (p // columns) * H, title, series, unpruned, x_max, x_label)
    x = 10
    font = _font()
    for method, colour in PALETTE.items():
        if not any(r["method"] == method or _layered(r) and str(r["method"]).startswith(f"{method}:") for r in rows):
            continue
        d.rectangle([x, H * n_rows + 8, x + 12, H * n_rows + 18], fill=colour)
        d.text((x + 16, H * n_rows + 6), method, fill=(0, 0, 0), font=font)
        x += 20 + int(d.textlength(method, font=font)) + 14
    img.save(path)
    return path
