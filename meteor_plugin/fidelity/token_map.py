"""Where the kept visual tokens are: the demo's ``--save-map`` picture, one row per encoder, one panel per stage.

The fidelity model's encoders each cover the whole image with a square grid of tokens (8x8 and 12x12 here). Stage 1
records the grid position of every token it kept, per encoder, in the order the tokens reach Stage 2;
Stage 2 records which of those it kept; Stage 3 which of the visual tokens entering the language model
it kept. Chained, they give each stage's survivors as grid cells, drawn over the image (dropped cells
darkened). Above the panels: the question and both answers (unpruned and METEOR); below them, a legend of what
the shading means; each row is named as the demo's header names its encoder (``fidelity.model.encoder_titles``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

STAGE_TITLES = (("encoder", "after Stage 1"), ("fusion", "after Stage 2"), ("llm", "after Stage 3"))
SCALE = 4  # each image pixel drawn as SCALE x SCALE
SHADE = (20, 20, 20, 170)  # over a dropped cell
LEGEND = (("kept token: the image shows through", None), ("dropped token: darkened", SHADE))
LINE = 14  # pixels per line of text
SWATCH = 12


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


def caption(question: str, unpruned: str, meteor: str, expected: Optional[str] = None) -> List[str]:
    """The lines above the panels: the question and both answers."""
    answers = f"unpruned: {unpruned}   METEOR: {meteor}" + (f"   expected: {expected}" if expected is not None else "")
    return [f"Q: {question}", answers]


def legend_boxes(top: int, left: int = 4) -> List[Tuple[Tuple[int, int, int, int], str, Any]]:
    """(swatch rectangle, text, shade) of each legend entry, drawn from ``top``."""
    return [((left, top + i * LINE + 1, left + SWATCH, top + i * LINE + 1 + SWATCH), text, shade)
            for i, (text, shade) in enumerate(LEGEND)]


def draw_map(image: torch.Tensor, cells: Dict[str, Dict[str, Set[int]]], grids: Dict[str, int], path: str,
             lines: Sequence[str] = (), titles: Optional[Dict[str, str]] = None) -> str:
    """image: uint8 (3, H, W); cells: ``kept_cells``; grids: encoder -> tokens per side; ``lines``: the caption
    (`caption`); ``titles``: encoder -> its name in the picture (default: the name). Writes a PNG."""
    base = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
        (image.shape[2] * SCALE, image.shape[1] * SCALE), Image.NEAREST)
    w, h = base.size
    stages = [(key, title) for key, title in STAGE_TITLES if key in cells]
    label_w, gap = 150, 8
    head = 4 + LINE * len(lines)
    title_h = head + 18
    legend_top = title_h + len(grids) * (h + gap)
    width = max(label_w + len(stages) * (w + gap), 6 * max((len(t) for t in lines), default=0) + 8)
    canvas = Image.new("RGB", (width, legend_top + LINE * len(LEGEND) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, text in enumerate(lines):
        draw.text((4, 2 + i * LINE), text, fill=(0, 0, 0), font=font)
    for col, (_, title) in enumerate(stages):
        draw.text((label_w + col * (w + gap), head + 2), title, fill=(0, 0, 0), font=font)
    titles = titles or {}
    for row, (name, side) in enumerate(grids.items()):
        y0 = title_h + row * (h + gap)
        label = titles.get(name, name).replace(" (", "\n(").replace(", ", ",\n")
        draw.multiline_text((4, y0 + 4), label, fill=(0, 0, 0), font=font)
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
                    sd.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], fill=SHADE)
            panel = Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB")
            canvas.paste(panel, (x0, y0))
            draw.rectangle([x0, y0 + h - 16, x0 + 52, y0 + h], fill=(0, 0, 0))
            draw.text((x0 + 3, y0 + h - 14), f"{len(kept)} kept", fill=(255, 255, 255), font=font)
    for box, text, shade in legend_boxes(legend_top):
        swatch = Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), (235, 235, 235, 255))
        if shade is not None:
            swatch = Image.alpha_composite(swatch, Image.new("RGBA", swatch.size, shade))
        canvas.paste(swatch.convert("RGB"), box[:2])
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((box[2] + 6, box[1]), text, fill=(0, 0, 0), font=font)
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
