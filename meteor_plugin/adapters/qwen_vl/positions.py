"""The language model's positions when a Qwen-VL prompt loses visual tokens.

Qwen's language model places tokens with multimodal RoPE: three rows of positions (temporal, height, width),
equal for text, an image's tokens at their (t, h, w) cell (offset by where the image starts), and the text after
an image continuing from the image's extent, ``max(h, w)`` cells, not from its token count. So the natural
position of a kept token is the one it has unpruned, and that is what every pruned prompt gets here: the model's
own ``get_rope_index`` runs on the user's prompt, and each token of the shortened prompt takes the column of the
token it is (a kept image token: the merged token it sits at). The text after an image does not move, and the
KV cache and decoding steps continue from the unpruned prompt's positions (``rope_deltas`` of the short prompt).
This is proportional attention's "kept tokens keep their unpruned positions", which under M-RoPE is the only
consistent choice; ``proportional_attention`` adds the sizes (log-size key bias) on top, as on the other families.

The positions go to the model as four rows, ``generate``'s form: the text row (each token's index among the
prompt's real tokens, which the mask code reads) and the three M-RoPE rows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..shared.transformers_vlm import fit_prompt, image_runs

GRID_KWARGS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def token_types(config: Any, ids: torch.Tensor, given: Optional[torch.Tensor]) -> torch.Tensor:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video): the processor's, or read off the placeholders."""
    if given is not None:
        return given
    return ((ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()).to(ids.device)


def text_row(mask: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Each token's index among its row's real tokens (0 on padding): ``generate``'s text positions."""
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def unpruned(inner: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], types: torch.Tensor,
             kwargs: Dict[str, Any]) -> torch.Tensor:
    """(3, B, L) M-RoPE positions the model gives the user's prompt."""
    names = inspect.signature(inner.get_rope_index).parameters
    extra = {k: kwargs[k] for k in GRID_KWARGS if k in names and kwargs.get(k) is not None}
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **extra)
    return positions


@dataclass
class Prompt:
    """The prompt the language model runs on, with its positions."""

    ids: torch.Tensor
    mask: Optional[torch.Tensor]
    types: torch.Tensor
    positions: torch.Tensor  # (4, B, L): text row, then t, h, w
    bias: torch.Tensor  # (B, L) float32: log(size) of each visual token, 0 elsewhere
    runs: List[tuple]  # (sample, start, end) of each image's tokens, in order

    @property
    def valid(self) -> torch.Tensor:
        return self.mask.bool() if self.mask is not None else torch.ones_like(self.ids, dtype=torch.bool)

    @property
    def deltas(self) -> torch.Tensor:
        """(B, 1): what ``rope_deltas`` is for this prompt (the next position less the prompt's length)."""
        rows = self.positions[1:].masked_fill(~self.valid, -1)
        return (rows.amax(dim=(0, 2)) + 1 - self.valid.sum(dim=1))[:, None]


def as_given(ids: torch.Tensor, mask: Optional[torch.Tensor], types: torch.Tensor, rope: torch.Tensor,
             token: int) -> Prompt:
    """The user's prompt, unchanged (Stage 3 alone)."""
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    positions = torch.cat([text_row(mask, ids)[None], rope], dim=0)
    bias = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    return Prompt(ids, mask, types, positions, bias, image_runs(ids, valid, token))


def fitted(ids: torch.Tensor, mask: Optional[torch.Tensor], types: torch.Tensor, rope: torch.Tensor, token: int,
           kept: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor]) -> Prompt:
    """The prompt with each image's run of image tokens cut to the tokens it keeps (``shared.transformers_vlm.fit_prompt``), every
    token at the position it has in the user's prompt: kept image token j of an image at the position of the
    merged token ``kept[image][j]``."""
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    before = image_runs(ids, valid, token)
    new_ids, new_mask, runs = fit_prompt(ids, mask, token, [int(k.shape[0]) for k in kept])
    new_valid = new_mask.bool() if new_mask is not None else torch.ones_like(new_ids, dtype=torch.bool)
    sources = _sources(valid, before, kept)
    rows = torch.zeros(3, *new_ids.shape, dtype=rope.dtype, device=rope.device)
    new_types = torch.zeros(new_ids.shape, dtype=types.dtype, device=types.device)
    for i, source in enumerate(sources):
        cols = torch.tensor(source, dtype=torch.long, device=ids.device)
        if cols.shape[0] != int(new_valid[i].sum()):
            raise RuntimeError(f"meteor-plugin: sample {i} of the fitted prompt has {int(new_valid[i].sum())} tokens "
                               f"but its kept tokens are {cols.shape[0]}")
        rows[:, i, new_valid[i]] = rope[:, i, cols.to(rope.device)]
        new_types[i, new_valid[i]] = types[i, cols.to(types.device)]
    bias = torch.zeros(new_ids.shape, dtype=torch.float32, device=ids.device)
    for (i, start, end), size in zip(runs, sizes):
        bias[i, start:end] = size.to(bias.device).float().clamp(min=1.0).log()
    positions = torch.cat([text_row(new_mask, new_ids)[None].to(rows.dtype), rows], dim=0)
    return Prompt(new_ids, new_mask, new_types, positions, bias, runs)


def _sources(valid: torch.Tensor, runs: List[tuple], kept: Sequence[torch.Tensor]) -> List[List[int]]:
    """Per row, the column of the user's prompt each token of the fitted prompt is."""
    out = []
    images = iter(zip(runs, kept))
    pending = next(images, None)
    for i in range(valid.shape[0]):
        source: List[int] = []
        cols = torch.nonzero(valid[i]).flatten().tolist()
        c = 0
        while c < len(cols):
            col = cols[c]
            if pending is not None and pending[0][0] == i and pending[0][1] == col:
                (_, start, end), anchors = pending
                source += [start + int(a) for a in anchors.tolist()]
                c += end - start
                pending = next(images, None)
            else:
                source.append(col)
                c += 1
        out.append(source)
    return out
