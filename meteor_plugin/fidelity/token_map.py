"""Where the kept visual tokens are: the demo's ``--save-map`` picture, one row per encoder, one panel per stage.

The fidelity model's encoders each cover the whole image with a square grid of tokens (8x8 and 12x12 here). Stage 1
records the grid position of every token it kept, per encoder, in the order the tokens reach Stage 2;
Stage 2 records which of those it kept; Stage 3 which of the visual tokens entering the language model
it kept. Chained, they give each stage's survivors as grid cells, drawn over the image (dropped cells
darkened).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Set

import torch
from PIL import Image, ImageDraw, ImageFont

STAGE_TITLES = (("encoder", "after Stage 1"), ("fusion", "after Stage 2"), ("llm", "after Stage 3"))
SCALE = 4  # each image pixel drawn as SCALE x SCALE


def kept_cells(stages: Dict[str, Any], encoders: Sequence[str]) -> Dict[str, Dict[str, Set[int]]]:
    """stage -> encoder -> grid cells kept, from one sample's stats (``RunStats.to_dict()['samples'][i]``)."""
    if "encoder" not in stages or "positions" not in stages["encoder"]:
        raise ValueError("the stats hold no Stage 1 positions: run the EAGLE-like model with post-projection fusion")
    positions = stages["encoder"]["positions"]
    order = [(name, p) for name in encoders for p in positions.get(name, [])]  # tokens in the order Stage 2 saw
    out = {"encoder": {name: set(positions.get(name, [])) for name in encoders}}
    survivors = order
    if "fusion" in stages and stages["fusion"].get("kept") is not None:
        survivors = [order[i] for i in stages["fusion"]["kept"]]
        out["fusion"] = _by_encoder(survivors, encoders)
    if "llm" in stages and stages["llm"].get("kept") is not None:
        out["llm"] = _by_encoder([survivors[i] for i in stages["llm"]["kept"]], encoders)
    return out


def _by_encoder(tokens: List[tuple], encoders: Sequence[str]) -> Dict[str, Set[int]]:
    out: Dict[str, Set[int]] = {name: set() for name in encoders}
    for name, cell in tokens:
        out[name].add(cell)
    return out


def draw_map(image: torch.Tensor, cells: Dict[str, Dict[str, Set[int]]], grids: Dict[str, int], path: str) -> str:
    """image: uint8 (3, H, W); cells: ``kept_cells``; grids: encoder -> tokens per side. Writes a PNG."""
    base = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
        (image.shape[2] * SCALE, image.shape[1] * SCALE), Image.NEAREST)
    w, h = base.size
    stages = [(key, title) for key, title in STAGE_TITLES if key in cells]
    label_w, title_h, gap = 110, 18, 8
    canvas = Image.new("RGB", (label_w + len(stages) * (w + gap), title_h + len(grids) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, (_, title) in enumerate(stages):
        draw.text((label_w + col * (w + gap), 2), title, fill=(0, 0, 0), font=font)
    for row, (name, side) in enumerate(grids.items()):
        y0 = title_h + row * (h + gap)
        draw.text((4, y0 + h // 2 - 12), f"{name}\n{side}x{side} tokens", fill=(0, 0, 0), font=font)
        for col, (key, _) in enumerate(stages):
            x0 = label_w + col * (w + gap)
            panel = base.copy()
            shade = Image.new("RGBA", panel.size, (0, 0, 0, 0))
            sd = ImageDraw.Draw(shade)
            cw, ch = w / side, h / side
            kept = cells[key].get(name, set())
            for cell in range(side * side):
                if cell not in kept:
                    r, c = divmod(cell, side)
                    sd.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], fill=(20, 20, 20, 170))
            panel = Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB")
            canvas.paste(panel, (x0, y0))
            draw.rectangle([x0, y0 + h - 16, x0 + 52, y0 + h], fill=(0, 0, 0))
            draw.text((x0 + 3, y0 + h - 14), f"{len(kept)} kept", fill=(255, 255, 255), font=font)
    canvas.save(path)
    return path


def grid_sides(per_encoder: Dict[str, List[int]]) -> Dict[str, int]:
    """Tokens per side of each encoder's square grid, from Stage 1's ``per_encoder`` [entering, kept]."""
    out = {}
    for name, (count, _) in per_encoder.items():
        side = int(math.isqrt(int(count)))
        if side * side != count:
            raise ValueError(f"encoder {name} has {count} tokens, not a square grid: cannot draw its map")
        out[name] = side
    return out
