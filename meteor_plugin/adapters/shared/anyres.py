"""LLaVA-1.6's spatial merges (``mm_patch_merge_type`` ``spatial`` / ``spatial_unpad``, ``anyres`` images).

Upstream encodes the base image and every high-resolution crop as full CLIP grids, reshapes the crops
into one map, cuts the padding rows or columns away (``unpad``), ends each row with the learned
``image_newline`` and puts the base image first. Its reshape asserts full grids, so Stage 1 cannot hand
it fewer tokens. Instead:

- Stage 1 prunes inside CLIP as usual (the later blocks run on the kept patches), and `spread_to_grid`
  puts each kept token back at its patch position in a full grid whose pruned positions hold NaN rows,
  a value no feature takes, so upstream's reshapes, unpad and newlines run unchanged;
- after the splice, `drop_pruned_rows` removes those rows from the embeddings, masks, position ids and
  labels, re-padding on upstream's padding side;
- `newline_rows` finds the row separators, which Stage 3 must never prune: they carry the map's
  structure, not content.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch


def is_spatial(model: Any) -> bool:
    return str(getattr(model.config, "mm_patch_merge_type", "flat")).startswith("spatial")


def spread_to_grid(features: torch.Tensor, kept: Sequence[Sequence[int]], patches: int) -> torch.Tensor:
    """(N, keep, D) kept tokens -> (N, patches, D), each at its patch position (``kept``, ascending), NaN
    elsewhere."""
    n, keep, d = features.shape
    index = torch.as_tensor([list(k) for k in kept], device=features.device, dtype=torch.long)
    if index.shape != (n, keep):
        raise RuntimeError(f"meteor-plugin: {tuple(index.shape)} kept positions for {n} images of {keep} tokens")
    grid = features.new_full((n, patches, d), float("nan"))
    return grid.scatter(1, index.unsqueeze(-1).expand(n, keep, d), features)


def crops_per_image(images: Any) -> Optional[List[int]]:
    """How many CLIP inputs (base image and crops) each image of a spatial merge became."""
    if torch.is_tensor(images) and images.dim() == 5:
        return [images.shape[1]] * images.shape[0]
    if isinstance(images, (list, tuple)):
        return [1 if x.dim() == 3 else x.shape[0] for x in images]
    if torch.is_tensor(images) and images.dim() == 4:
        return [1] * images.shape[0]
    return None


def _repad(rows: List[torch.Tensor], length: int, left: bool, fill: Any) -> torch.Tensor:
    out = rows[0].new_full((len(rows), length) + tuple(rows[0].shape[1:]), fill)
    for i, row in enumerate(rows):
        if left:
            out[i, length - row.shape[0]:] = row
        else:
            out[i, :row.shape[0]] = row
    return out


def drop_pruned_rows(model: Any, out: tuple) -> Tuple[tuple, int]:
    """Remove Stage 1's NaN rows from what ``prepare_inputs_labels_for_multimodal`` returned
    ``(input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``.

    Returns the new tuple and how many rows were removed. A row is dropped only where every value is NaN;
    a NaN in part of a row is a real NaN and stays (the model's own problem, not hidden here).
    """
    ids, position_ids, mask, past, embeds, labels = out
    pruned = torch.isnan(embeds).all(dim=-1)
    removed = int(pruned.sum())
    if removed == 0:
        return out, 0
    b, length = embeds.shape[:2]
    valid = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool, device=embeds.device)
    if bool((pruned & ~valid).any()):
        raise RuntimeError("meteor-plugin: a pruned patch landed in padding; the splice is not LLaVA's")
    keep = valid & ~pruned
    counts = keep.sum(dim=1)
    new_length = int(counts.max())
    left = getattr(model.config, "tokenizer_padding_side", "right") == "left"
    embeds2 = _repad([embeds[i][keep[i]] for i in range(b)], new_length, left, 0)
    mask2 = _repad([torch.ones(int(c), dtype=torch.bool, device=embeds.device) for c in counts], new_length, left, False)
    labels2 = None
    if labels is not None:
        labels2 = _repad([labels[i][keep[i]] for i in range(b)], new_length, left, -100)
    position2 = None
    if position_ids is not None:
        position2 = _repad([torch.arange(int(c), device=embeds.device, dtype=position_ids.dtype) for c in counts],
                           new_length, left, 0)
    if mask is None and bool((counts == new_length).all()):
        mask2 = None  # upstream returned no mask: keep it so when every row still has the same length
    elif mask is not None:
        mask2 = mask2.to(mask.dtype)
    return (ids, position2, mask2, past, embeds2, labels2), removed


def newline_rows(model: Any, embeds: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, L) bool: rows equal to the model's ``image_newline``, or None when it has none."""
    newline = getattr(model.get_model(), "image_newline", None)
    if newline is None:
        return None
    return (embeds == newline.to(embeds.dtype).view(1, 1, -1)).all(dim=-1)
