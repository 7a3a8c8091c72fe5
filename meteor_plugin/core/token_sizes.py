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

from .select import compaction_index, gather_tokens


@torch.no_grad()  # sizes are counts: no gradient flows through which kept token a dropped one resembles
def absorbed_sizes(features: torch.Tensor, keep: torch.Tensor, sizes: Optional[torch.Tensor] = None,
                   valid: Optional[torch.Tensor] = None, group: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every token's size once each dropped token's size is added to its closest kept token.

    features: (B, N, C); keep: (B, N) bool, the kept tokens; sizes: (B, N), ones when None; valid: (B, N) the
    tokens that take part (others keep their size and receive none); group: (N,) the group of each token (a
    dropped token goes to a kept token of its own group when there is one, else to any). Returns (B, N)
    float32: 0 on dropped tokens, so the total over the valid tokens of a row is kept (a row that keeps
    none of them is left as it was).
    """
    b, n, _ = features.shape
    sizes = torch.ones(b, n, dtype=torch.float32, device=features.device) if sizes is None else sizes.float()
    valid = torch.ones_like(keep) if valid is None else valid
    targets = keep & valid
    dropped = valid & ~keep & targets.any(dim=1, keepdim=True)
    if not bool(dropped.any()):
        return sizes
    # Only the dropped rows against the kept columns, (M, K): the kept tokens' own rows are never needed.
    rows, live = compaction_index(dropped)
    slots, filled = compaction_index(targets)
    # A row's argmax over the kept columns does not depend on the row's own norm: only the columns are scaled.
    sim = gather_tokens(features, rows).float() @ F.normalize(gather_tokens(features, slots).float(), dim=-1).transpose(1, 2)
    sim = sim.masked_fill(~filled[:, None, :], float("-inf"))
    if group is not None:
        group = group.to(features.device)
        same = group[rows][:, :, None] == group[slots][:, None, :]  # (B, M, K)
        has_same = (same & filled[:, None, :]).any(dim=2, keepdim=True)
        sim = sim.masked_fill(has_same & ~same, float("-inf"))
    target = torch.gather(slots, 1, sim.argmax(dim=2))  # (B, M): each dropped token's closest kept token
    moved = torch.gather(sizes, 1, rows).masked_fill(~live, 0.0)  # padding rows move nothing
    return sizes.masked_fill(dropped, 0.0).scatter_add_(1, target, moved)


def kept_sizes(features: torch.Tensor, index: torch.Tensor, sizes: Optional[torch.Tensor] = None,
               group: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sizes of the tokens ``index`` keeps (B, K), in ``index`` order (`absorbed_sizes` with every token
    taking part)."""
    b, n, _ = features.shape
    keep = torch.zeros(b, n, dtype=torch.bool, device=features.device).scatter_(1, index, True)
    return torch.gather(absorbed_sizes(features, keep, sizes, group=group), 1, index)
