"""Token scores of Stages 1 and 2 (pure tensor functions, no model knowledge).

- ``similarity_to_mean``: shallow-layer redundancy; the mean token stands for the low-frequency
  background, so tokens most similar to it are dropped first (METEOR, finding 1).
- ``cls_attention`` / ``received_attention``: deep-layer importance from one block's q/k; the
  second is for encoders without a CLS token (mean attention each token receives).
- ``cooperative_redundancy``: Stage 2's cross-encoder redundancy, the summed cosine similarity of a
  token to the surviving tokens of every other encoder, optionally after ``centre_per_owner``.
- ``duplicate_aware_mask``: Stage 2's default, a greedy selection in which a token is redundant only
  when a token of another encoder that is already kept carries the same content.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def similarity_to_mean(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C). Cosine similarity of each token to the mean token, (B, N)."""
    mean = x.float().mean(dim=1, keepdim=True)
    return F.cosine_similarity(x.float(), mean, dim=-1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k: (B, H, T, d) with the CLS token at index 0. Attention of CLS to the other T-1 tokens,
    averaged over heads: (B, T-1)."""
    logits = torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale  # (B, H, 1, T)
    probs = torch.softmax(logits, dim=-1)[:, :, 0, 1:]
    return probs.mean(dim=1)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """q, k: (B, H, T, d). Mean attention each token receives over all queries and heads: (B, T)."""
    b, h, t, _ = q.shape
    total = torch.zeros(b, t, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for start in range(0, t, chunk):
        probs = torch.softmax(torch.matmul(q[:, :, start:start + chunk].float(), kt) * scale, dim=-1)
        total += probs.sum(dim=(1, 2))
    return total / (h * t)


def centre_per_owner(z: torch.Tensor, owner: torch.Tensor, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z minus, per sample, the mean of its encoder's (alive) tokens. Separately trained projectors give
    each encoder's tokens their own common offset, and an uncentred cosine between two encoders then
    measures the offsets rather than the content."""
    z = z.float()
    weight = torch.ones(z.shape[:2], device=z.device) if alive is None else alive.float()
    slot = owner.to(z.device).unique(return_inverse=True)[1]  # each token's owner as 0..n-1
    n = int(slot.max()) + 1
    # Every owner's sum in one pass (not a masked copy per owner); with every token alive, from z itself.
    sums = z.new_zeros(z.shape[0], n, z.shape[2]).index_add_(1, slot, z if alive is None else z * weight.unsqueeze(-1))
    counts = weight.new_zeros(z.shape[0], n).index_add_(1, slot, weight)
    return z - (sums / counts.clamp(min=1.0).unsqueeze(-1)).index_select(1, slot)


def cooperative_redundancy(z: torch.Tensor, owner: torch.Tensor, alive: Optional[torch.Tensor] = None,
                           centred: bool = False) -> torch.Tensor:
    """METEOR's mutual redundancy ``R_i = sum_{m of other encoders} cos(z_i, z_m)``.

    z: (B, T, D) projected tokens of all encoders, concatenated; owner: (T,) encoder index of each
    token; alive: (B, T) bool, the surviving tokens that count as others (default: all); centred: take
    the cosine after `centre_per_owner`. Returns (B, T); lower means the token adds more that the other
    encoders do not already cover.
    """
    owner = owner.to(z.device)
    if centred:
        z = centre_per_owner(z, owner, alive)
    zn = F.normalize(z.float(), dim=-1)
    sim = torch.matmul(zn, zn.transpose(-1, -2))  # (B, T, T)
    other = owner.view(-1, 1) != owner.view(1, -1)  # (T, T)
    weight = other.unsqueeze(0).float()
    if alive is not None:
        weight = weight * alive.unsqueeze(1).float()
    return (sim * weight).sum(dim=-1)


def owner_normalised_importance(c: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Each centred token's norm over its encoder's root-mean-square norm, per sample: (B, T). How far a
    token is from its encoder's typical token, on a scale shared by encoders whose features differ in size
    (so no encoder wins or loses its whole share through its projector's scale alone)."""
    norms = c.norm(dim=-1)
    out = torch.empty_like(norms)
    for j in owner.unique().tolist():
        cols = owner == j
        rms = norms[:, cols].pow(2).mean(dim=1, keepdim=True).sqrt()
        out[:, cols] = norms[:, cols] / rms.clamp(min=1e-12)
    return out


def cross_owner_similarity(u: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(B, T, T): the cosines of unit tokens ``u`` (B, T, D) floored at 0, and 0 between tokens of the same
    owner. Where each owner's tokens are one contiguous run (as Stage 2 joins its encoders), only the blocks
    between two owners, above the diagonal, are multiplied and the rest mirrored: on EAGLE-X4's four
    encoders about a third of the products of the whole matrix."""
    b, t, _ = u.shape
    cuts = torch.nonzero(owner[1:] != owner[:-1]).flatten().add(1).tolist()
    bounds = [0, *cuts, t]
    if len(set(owner.tolist())) != len(bounds) - 1 or len(bounds) < 3:  # an owner in several runs, or only one
        sim = torch.matmul(u, u.transpose(-1, -2)).clamp(min=0)
        return sim * (owner.view(-1, 1) != owner.view(1, -1)).unsqueeze(0)
    sim = u.new_empty(b, t, t)  # every element is written once below
    for a0, a1 in zip(bounds[:-1], bounds[1:]):
        sim[:, a0:a1, a0:a1] = 0.0
        if a1 < t:
            block = torch.matmul(u[:, a0:a1], u[:, a1:].transpose(-1, -2)).clamp_(min=0)  # against every later owner
            sim[:, a0:a1, a1:] = block
            sim[:, a1:, a0:a1] = block.transpose(-1, -2)
    return sim


def duplicate_aware_mask(z: torch.Tensor, owner: torch.Tensor, keep: int,
                         reserved: Optional[torch.Tensor] = None, quota: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Stage 2's duplicate-aware selection: keep ``keep`` of the T tokens of each sample, greedily.

    z: (B, T, D) projected tokens of all encoders; owner: (T,) encoder of each. Tokens are centred per
    encoder (``centre_per_owner``); a token's importance is ``owner_normalised_importance``, and its
    redundancy the highest centred cosine (floored at 0) to a token already kept *from another encoder*.
    Each step keeps the token of highest importance minus redundancy (ties: lower index). Two encoders
    that see the same object keep it once; what only one encoder sees is never penalised, however
    similar the background of the other. ``reserved``: (T,) bool, tokens kept before the greedy starts (the
    spread floor; they count as kept for redundancy). ``quota``: tokens each encoder keeps (owners in
    ascending order, reserved ones included, summing to ``keep``): an encoder whose share is full takes no
    more. Returns a (B, T) bool mask with exactly min(keep, T) per row.
    """
    b, t, _ = z.shape
    owner = owner.to(z.device)
    c = centre_per_owner(z, owner)
    importance = owner_normalised_importance(c, owner)
    sim = cross_owner_similarity(F.normalize(c, dim=-1), owner)
    kept = torch.zeros(b, t, dtype=torch.bool, device=z.device)
    if reserved is not None:
        kept |= reserved.to(z.device)
    rows = torch.nonzero(kept[0]).flatten()  # the reserved tokens, the same in every row
    # The highest similarity to a kept token (similarities are >= 0: none kept is 0).
    redundancy = sim[:, rows].amax(dim=1) if rows.numel() else sim.new_zeros(b, t)
    # Equal gains go to the lower index: a tiny decreasing tie-break, below any real difference.
    tie = torch.arange(t, device=z.device, dtype=torch.float32) * -1e-7
    steps = min(keep, t) - int(kept[0].sum())
    slot = owner.unique(return_inverse=True)[1]  # each token's encoder as 0..n-1
    encoders = int(slot.max()) + 1
    if quota is None:
        room = torch.full((b, encoders), t, device=z.device)
    else:
        room = torch.as_tensor(list(quota), device=z.device).expand(b, -1).clone()
        if len(quota) == encoders:
            room -= torch.stack([(kept & (slot == j)).sum(dim=1) for j in range(encoders)], dim=1)
        if len(quota) != encoders or sum(quota) != min(keep, t) or (room < 0).any():
            raise ValueError(f"quota={list(quota)} is invalid: allowed one share per encoder, summing to {min(keep, t)}, "
                             "each at least the encoder's reserved tokens")
    greedy = _greedy_numpy if z.device.type == "cpu" else _greedy_tensor
    # A selection, not a function of z to differentiate: nothing here needs gradients (training runs it too).
    return greedy(importance.detach().float(), tie, redundancy.detach().float(), sim.detach().float(), kept, steps,
                  slot, room)


def _greedy_tensor(importance: torch.Tensor, tie: torch.Tensor, redundancy: torch.Tensor, sim: torch.Tensor,
                   kept: torch.Tensor, steps: int, slot: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """The greedy as tensor ops, for accelerators (no copy to the host, no sync per step). slot: (T,) encoder
    of each token as 0..n-1; room: (B, n) tokens each encoder may still take."""
    rows = torch.arange(kept.shape[0], device=kept.device)
    for _ in range(steps):
        closed = kept | (room[:, slot] <= 0)
        pick = (importance - redundancy + tie).masked_fill(closed, float("-inf")).argmax(dim=1)
        kept[rows, pick] = True
        room[rows, slot[pick]] -= 1
        redundancy = torch.maximum(redundancy, sim[rows, pick])
    return kept


def _greedy_numpy(importance: torch.Tensor, tie: torch.Tensor, redundancy: torch.Tensor, sim: torch.Tensor,
                  kept: torch.Tensor, steps: int, slot: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """The same greedy on the CPU in numpy, row by row: each of the hundreds of steps is a few small
    vector ops, which cost torch's per-op dispatch more than their arithmetic (EAGLE-X4 shape: 576 of
    1193 tokens, 3.9% of the pruned prefill before). Same float32 arithmetic, same picks."""
    out = kept.clone()
    tie, slot = tie.numpy(), slot.cpu().numpy()
    for row in range(kept.shape[0]):
        imp, r, s = importance[row].numpy(), redundancy[row].numpy().copy(), sim[row].numpy()
        taken = out[row].numpy()  # shares memory with ``out``
        left = room[row].cpu().numpy().copy()
        # A closed token's redundancy is +inf, so its gain is -inf with no masking per step (the maximum below
        # keeps it); the open tokens' gains are computed exactly as before.
        r[taken | (left[slot] <= 0)] = np.inf
        gain = np.empty_like(imp)
        for _ in range(steps):
            np.subtract(imp, r, out=gain)
            gain += tie
            pick = int(gain.argmax())
            taken[pick] = True
            r[pick] = np.inf
            left[slot[pick]] -= 1
            if left[slot[pick]] <= 0:
                r[slot == slot[pick]] = np.inf
            np.maximum(r, s[pick], out=r)
    return out
