"""Tiny transformers Qwen2-VL, Qwen2.5-VL and Qwen3-VL models with random weights, and prompts for them, built
without the model hub or a processor.

A Qwen image is a grid of (t, h, w) patches; the processor flattens each image's patches so that every
``spatial_merge_size``-square of them is contiguous (one language-model token after the merger) and writes one
image token per merged token. Random pixels in that layout are all the tower needs, so ``qwen_batch`` builds
the inputs the processor would: ``input_ids`` with a <vision_start> <image_pad>*n <vision_end> run per image,
``attention_mask``, ``mm_token_type_ids`` (1 on image tokens, 2 on video tokens), ``pixel_values`` and
``image_grid_thw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .llm import TinyLlm, llm_config_kwargs

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Token ids in the tiny vocabulary (256): text is drawn from [3, 240).
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253
CLASSES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}


@dataclass
class TinyQwenSpec(TinyLlm):
    kind: str = "qwen2_vl"
    vision_hidden: int = 32
    vision_layers: int = 6  # Stage 1's boundaries at blocks 2 and 4
    vision_heads: int = 2
    patch_size: int = 4
    temporal_patch_size: int = 2
    merge: int = 2
    vision_intermediate: Optional[int] = None  # the tower's MLP width (None: twice vision_hidden)
    window_size: int = 16  # Qwen2.5-VL: windows of (16 / patch 4 / merge 2)^2 = 4 merged tokens
    fullatt_blocks: Tuple[int, ...] = (2, 5)  # Qwen2.5-VL
    deepstack_layers: Tuple[int, ...] = (1, 3, 4)  # Qwen3-VL: ViT blocks whose outputs feed the first LLM layers
    rope_theta: float = 10000.0
    mrope: Optional[Tuple[int, int, int]] = None  # M-RoPE's (t, h, w) shares of the head's rotary pairs


def mrope_section(head_dim: int) -> List[int]:
    """Temporal, height and width shares of the head's rotary pairs (the real models' 16/24/24 of 64, scaled)."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny_qwen_vl(spec: Optional[TinyQwenSpec] = None):
    """``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
    ``Qwen3VLForConditionalGeneration`` (``spec.kind``), tiny, seeded, eval mode, eos off."""
    import transformers

    spec = spec or TinyQwenSpec()
    name = CLASSES[spec.kind]
    text = llm_config_kwargs(spec)
    text.pop("tokenizer_padding_side")
    head_dim = spec.llm_hidden // spec.llm_heads
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta,
                               "mrope_section": list(spec.mrope or mrope_section(head_dim))}
    vision = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  temporal_patch_size=spec.temporal_patch_size, spatial_merge_size=spec.merge, in_channels=3)
    mlp = spec.vision_intermediate or 2 * spec.vision_hidden
    if spec.kind == "qwen2_vl":
        vision.update(embed_dim=spec.vision_hidden, hidden_size=spec.llm_hidden, mlp_ratio=mlp // spec.vision_hidden)
    else:
        vision.update(hidden_size=spec.vision_hidden, intermediate_size=mlp, out_hidden_size=spec.llm_hidden)
    if spec.kind == "qwen2_5_vl":
        vision.update(window_size=spec.window_size, fullatt_block_indexes=list(spec.fullatt_blocks))
    if spec.kind == "qwen3_vl":
        vision.update(deepstack_visual_indexes=list(spec.deepstack_layers), num_position_embeddings=64)
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
    config = getattr(transformers, name + "Config")(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    config._attn_implementation = spec.attn_implementation
    config.text_config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed + 1)
    model = getattr(transformers, name + "ForConditionalGeneration")(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def merged_tokens(model, grid: Sequence[int]) -> int:
    """Language-model tokens of one (t, h, w) patch grid."""
    merge = int(model.config.vision_config.spatial_merge_size)
    t, h, w = (int(x) for x in grid)
    return t * h * w // (merge * merge)


def qwen_pixels(model, grids: Sequence[Sequence[int]], seed: int = 0) -> torch.Tensor:
    """Random flattened patches, one row per patch of every grid (the processor's ``pixel_values``)."""
    vision = model.config.vision_config
    width = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    rows = sum(int(t) * int(h) * int(w) for t, h, w in grids)
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed + 7))


def qwen_batch(model, samples: Sequence[Sequence[Tuple[int, Sequence[int]]]], tail: Sequence[int],
               pad_side: str = "left", seed: int = 0, video: bool = False) -> Dict[str, torch.Tensor]:
    """A batch as the processor writes it. ``samples[i]``: the sample's images in order, each (text tokens before
    it, its (t, h, w) grid); ``tail[i]``: text tokens after the last image (the instruction). ``video``: the
    visual inputs are videos (``pixel_values_videos``, ``video_grid_thw``; Qwen3-VL's processor writes each
    temporal patch as its own run after a timestamp)."""
    g = torch.Generator().manual_seed(seed)
    token = VIDEO_TOKEN if video else IMAGE_TOKEN
    rows: List[List[int]] = []
    grids: List[Sequence[int]] = []
    for images, after in zip(samples, tail):
        row: List[int] = [1]
        for before, grid in images:
            row += torch.randint(3, 240, (before,), generator=g).tolist()
            if video and model.config.model_type == "qwen3_vl":  # a timestamp, then its own run, per frame
                frame = merged_tokens(model, (1, grid[1], grid[2]))
                for _ in range(int(grid[0])):
                    row += [int(torch.randint(3, 240, (1,), generator=g))] + [VISION_START] + [token] * frame + [VISION_END]
            else:
                row += [VISION_START] + [token] * merged_tokens(model, grid) + [VISION_END]
            grids.append(grid)
        row += torch.randint(3, 240, (after,), generator=g).tolist()
        rows.append(row)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if pad_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    types = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    pixels, thw = qwen_pixels(model, grids, seed), torch.tensor([list(map(int, x)) for x in grids], dtype=torch.long)
    if video:
        out.update(pixel_values_videos=pixels, video_grid_thw=thw)
    else:
        out.update(pixel_values=pixels, image_grid_thw=thw)
    return out


def sample_of(batch: Dict[str, torch.Tensor], model, i: int) -> Dict[str, torch.Tensor]:
    """Sample ``i`` of a ``qwen_batch`` alone, unpadded, with its own images."""
    valid = batch["attention_mask"][i].bool()
    out = {k: batch[k][i][valid].unsqueeze(0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pixels_key, grid_key, token in (("pixel_values", "image_grid_thw", IMAGE_TOKEN),
                                        ("pixel_values_videos", "video_grid_thw", VIDEO_TOKEN)):
        if pixels_key not in batch:
            continue
        merge = int(model.config.vision_config.spatial_merge_size) ** 2
        per_row = [int(((batch["input_ids"][j] == token) & batch["attention_mask"][j].bool()).sum())
                   for j in range(batch["input_ids"].shape[0])]
        grids = batch[grid_key]
        counts = [int(g.prod()) // merge for g in grids]
        # images of earlier rows, then this row's
        first = 0
        seen = 0
        while seen < sum(per_row[:i]):
            seen += counts[first]
            first += 1
        last = first
        taken = 0
        while taken < per_row[i]:
            taken += counts[last]
            last += 1
        patches = [int(g.prod()) for g in grids]
        start = sum(patches[:first])
        out[pixels_key] = batch[pixels_key][start:start + sum(patches[first:last])]
        out[grid_key] = grids[first:last]
    return out
