"""How many tokens each kept token stands for, when a stage drops the others (no model knowledge).

ToMe's proportional attention: a token that stands for ``s`` tokens attends as ``s`` copies of itself,
``log(s)`` added to its attention logit. Here each dropped token's size goes to the kept token whose
features are most cosine-similar to it (within its own group, an encoder, while that group keeps any), so
the attention a group of look-alike tokens drew before pruning is drawn by what is left of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kept_sizes(features: torch.Tensor, index: torch.Tensor, sizes: Optional[torch.Tensor] = None,
               group: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sizes of the tokens ``index`` keeps, once every other token's size is added to its closest kept one.

    features: (B, N, C) the tokens the selection saw; index: (B, K) the kept ones; sizes: (B, N), ones when
    None; group: (N,) the group of each token (a dropped token goes to a kept token of its own group when
    there is one, else to any). Returns (B, K) float32, in ``index`` order; the total per row is kept.
    """
    b, n, _ = features.shape
    sizes = torch.ones(b, n, dtype=torch.float32, device=features.device) if sizes is None else sizes.float()
    if index.shape[1] >= n:
        return torch.gather(sizes, 1, index)
    keep = torch.zeros(b, n, dtype=torch.bool, device=features.device).scatter_(1, index, True)
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ torch.gather(unit, 1, index.unsqueeze(-1).expand(-1, -1, unit.shape[-1])).transpose(1, 2)  # (B, N, K)
    if group is not None:
        group = group.to(features.device)
        same = group[None, :, None] == group[index][:, None, :]  # (B, N, K): kept token k is of token i's group
        has_same = same.any(dim=2, keepdim=True)
        sim = sim.masked_fill(has_same & ~same, float("-inf"))
    target = sim.argmax(dim=2)  # (B, N) slot in index of each token's closest kept token
    dropped = sizes.masked_fill(keep, 0.0)
    out = torch.gather(sizes, 1, index)
    return out.scatter_add_(1, target, dropped)
