"""Where the visual tokens and the instruction sit in the language model's input sequence.

The multimodal adapters (adapters/) build a ``VisualLayout`` when they splice image features into the
text, and hand it to the language model's next forward; Stage 3 reads it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..stats import RunStats

IGNORE_INDEX = -100


@dataclass
class VisualLayout:
    visual: torch.Tensor  # (B, L) bool: visual tokens
    query: torch.Tensor  # (B, L) bool: instruction tokens whose attention scores the visual tokens
    valid: torch.Tensor  # (B, L) bool: not padding
    stats: RunStats
    labels: Optional[torch.Tensor] = None  # (B, L) labels held back for the loss after compaction
    # MeteorConfig.proportional_attention: each token's position had nothing been pruned, and log(size) of
    # each visual token (0 elsewhere), added to its attention logit in every layer.
    positions: Optional[torch.Tensor] = None  # (B, L) long, or (rows, B, L) for multimodal RoPE (Qwen-VL)
    key_bias: Optional[torch.Tensor] = None  # (B, L) float32

    @property
    def shape(self):
        return tuple(self.visual.shape)

    def repeated(self, times: int) -> "VisualLayout":
        """Each sample ``times`` times in a row, as generate expands a batch for ``num_return_sequences``."""
        def rep(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # the batch is the next-to-last dim
            return t.repeat_interleave(times, dim=-2) if t is not None else None

        stats = RunStats(self.stats.batch_size * times,
                         stages=[dict(s) for s in self.stats.stages for _ in range(times)],
                         notes=list(self.stats.notes))
        return VisualLayout(rep(self.visual), rep(self.query), rep(self.valid), stats, rep(self.labels),
                            rep(self.positions), rep(self.key_bias))


def query_mask(
    visual: torch.Tensor,
    valid: torch.Tensor,
    labels: Optional[torch.Tensor],
    text_query: str,
) -> torch.Tensor:
    """Instruction tokens used as Stage 3's query, per sample.

    The instruction is the text after the last visual token and before the first answer token
    (labels != IGNORE_INDEX); answer tokens, and anything after them, never act as the query, so
    training cannot leak the answer into the choice of tokens. ``text_query='last'`` keeps only the
    last instruction token. A sample with no instruction text (e.g. an image followed directly by its
    caption) uses the token that predicts the first answer token, or its last token.
    """
    b, length = visual.shape
    pos = torch.arange(length, device=visual.device).expand(b, length)
    has_visual = visual.any(dim=1)
    last_visual = torch.where(visual, pos, torch.full_like(pos, -1)).max(dim=1).values
    if labels is not None:
        answer = (labels != IGNORE_INDEX) & valid
        first_answer = torch.where(answer, pos, torch.full_like(pos, length)).min(dim=1).values
    else:
        first_answer = torch.full((b,), length, device=visual.device, dtype=torch.long)
    query = valid & ~visual & (pos > last_visual[:, None]) & (pos < first_answer[:, None])
    if text_query == "last":
        last = torch.where(query, pos, torch.full_like(pos, -1)).max(dim=1).values
        query = pos == last[:, None]
        query &= (last >= 0)[:, None]
    # Fallback: the last valid token before the first answer (or the last valid token).
    empty = ~query.any(dim=1) & has_visual
    if bool(empty.any()):
        before = valid & (pos < first_answer[:, None])
        last_before = torch.where(before, pos, torch.full_like(pos, -1)).max(dim=1).values
        last_valid = torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=1).values
        pick = torch.where(last_before >= 0, last_before, last_valid)
        query = query | (empty[:, None] & (pos == pick[:, None]))
    return query & has_visual[:, None]


def identity_geometry(valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions, key_bias) when nothing was pruned before the language model (Stage 3 alone): every valid
    token at its own place, counted from 0 in its row, with size 1."""
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0).masked_fill(~valid, 0)
    return positions, torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)


def unpruned_geometry(visual: torch.Tensor, valid: torch.Tensor, owners: Sequence[Optional[int]],
                      images: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions, key_bias), both (B, L), for ``VisualLayout`` under ``proportional_attention``.

    ``images``: per image, in the order they were spliced, its ``ImageTokens`` (kept tokens' places among the
    image's unpruned ones, their sizes, the unpruned count); ``owners``: the sample each image went to (None:
    the dummy image of a text-only sample). In each row the valid tokens count from 0; an image advances the
    count by all of its unpruned tokens, each kept one sitting at its own place among them, as unpruned.
    """
    if len(images) != len(owners):
        raise RuntimeError(f"meteor-plugin: {len(images)} images were encoded but {len(owners)} spliced")
    b, length = visual.shape
    positions = torch.zeros(b, length, dtype=torch.long, device=visual.device)
    bias = torch.zeros(b, length, dtype=torch.float32, device=visual.device)
    for i in range(b):
        mine = [img for img, owner in zip(images, owners) if owner == i]
        offset: List[torch.Tensor] = []
        advance: List[torch.Tensor] = []
        sizes: List[torch.Tensor] = []
        for img in mine:
            step = torch.zeros(len(img.positions), dtype=torch.long)
            step[-1] = img.total  # after the image: the tokens after it continue from its unpruned count
            offset.append(img.positions.cpu().long())
            advance.append(step)
            sizes.append(img.sizes.cpu().float())
        cols = torch.nonzero(valid[i]).flatten().cpu()
        is_visual = visual[i, cols].cpu()
        n_visual = int(is_visual.sum())
        token_offset = torch.zeros(len(cols), dtype=torch.long)
        token_advance = torch.ones(len(cols), dtype=torch.long)
        if n_visual:
            all_offset = torch.cat(offset)[:n_visual] if offset else torch.zeros(0, dtype=torch.long)
            if all_offset.shape[0] != n_visual:
                raise RuntimeError(f"meteor-plugin: sample {i} has {n_visual} visual tokens but its images kept "
                                   f"{all_offset.shape[0]}")
            token_offset[is_visual] = all_offset
            token_advance[is_visual] = torch.cat(advance)[:n_visual]
            bias[i, cols[is_visual].to(visual.device)] = torch.cat(sizes)[:n_visual].clamp(min=1.0).log().to(bias.device)
        base = torch.cumsum(token_advance, 0) - token_advance
        positions[i, cols.to(visual.device)] = (base + token_offset).to(visual.device)
    return positions, bias
