"""Stage 3 by coverage: keep the visual tokens that stand for what the question attends to, and spend as many
as it takes to stand for most of it (no model knowledge).

Top-K by attention keeps the K most attended tokens. At a shallow layer of the language model that can be K
tokens of one look-alike region: on the fidelity model, layer 2's attention of a counting question puts 69% of
its mass on the background, and its top 50 tokens held the centre of a counted object in half the cases. Here
a kept token *covers* every token as much as the two look alike (``Z_ij``: the centred cosine of their states to
a power, as in ``text_attention.attended_regions``), and the kept set is chosen greedily to cover as much of the
attention as it can (facility location: maximise ``sum_i p_i max_{j kept} Z_ij``, a submodular function, so the
greedy order is within 1 - 1/e of the best set of each size). One token of the background covers the whole
background; the next ones go to the other regions attended, most attended first. Proportional attention hands
each dropped token's size to the kept token most like it: the kept set is the one whose tokens best stand for
the attention of those they absorb.

The budget read from the same order (``llm_budget_signal="coverage"``): how many greedy picks it takes to cover
``share`` of the attention: one for a question about the look-alike background, one per object for a question
that attends to every object of a colour.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .text_attention import _power


@torch.no_grad()  # a choice of tokens, not a quantity to differentiate
def region_similarity(states: torch.Tensor, sharpness: float = 16.0) -> torch.Tensor:
    """``Z``: (N, N) in [0, 1], how much each token of ``states`` (N, D) looks like each other one:
    ``max(0, cos(h_i - m, h_j - m)) ** sharpness`` for the states centred on their mean ``m`` (all of a model's
    visual tokens share a large offset that would make every pair look alike), 1 on the diagonal and between
    tokens at the mean (alike, whatever their cosine)."""
    x = states.float()
    x = x - x.mean(dim=0, keepdim=True)
    norm = x.norm(dim=-1)
    typical = norm <= 1e-6 * float(norm.max().clamp(min=1e-30)) if norm.numel() else norm.bool()
    x = x / norm.clamp(min=1e-30)[:, None]
    z = _power(torch.mm(x, x.T).clamp_(min=0, max=1), sharpness)
    if bool(typical.any()):
        z[typical[:, None] & typical[None, :]] = 1.0
    return z.fill_diagonal_(1.0)


@torch.no_grad()
def greedy_cover(p: torch.Tensor, z: torch.Tensor, picks: int, share: Optional[float] = None, block: int = 32
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The greedy order of facility location on attention ``p`` (N,) >= 0 (summing to 1) and similarity ``z``
    (N, N): each pick is the token that adds the most covered attention, ``sum_i p_i max(0, z_ij - c_i)`` with
    ``c_i`` what the kept tokens already cover of token i (ties: the lower index). Once nothing is left to
    cover, the rest go by attention (ties: the lower index).

    Lazy (Minoux): a token's gain only falls as the kept set grows, so a gain computed earlier bounds it; each
    pick recomputes the gains of the ``block`` best bounds until the best bound is exact. The same order as
    recomputing every gain at every pick, for O(N * block) a pick instead of O(N^2).

    Stops after ``picks`` tokens, or, with ``share``, as soon as the kept tokens cover that share of the
    attention (whichever comes first). Returns (order (M,) long, covered (M + 1,) float64: the share covered
    after 0, 1, ..., M picks)."""
    n = p.shape[0]
    picks = min(int(picks), n)
    p = p.float()
    z = z.float()
    cover = torch.zeros(n, dtype=torch.float32, device=p.device)
    bound = torch.mv(z.T, p)  # every gain, exact for the empty set
    exact = torch.ones(n, dtype=torch.bool, device=p.device)
    taken = torch.zeros(n, dtype=torch.bool, device=p.device)
    order = []
    covered = [0.0]
    while len(order) < picks and (share is None or covered[-1] < share):
        while True:
            open_bound = bound.masked_fill(taken, float("-inf"))
            j = int(torch.argmax(open_bound))  # the first of equal bounds: ties go to the lower index
            if exact[j]:
                break
            stale = open_bound.masked_fill(exact, float("-inf"))
            cand = torch.topk(stale, min(block, int((~exact & ~taken).sum()))).indices
            bound[cand] = torch.mv((z[:, cand] - cover[:, None]).clamp_(min=0).T, p)
            exact[cand] = True
        if float(bound[j]) <= 0:  # everything attended is covered: the rest by attention alone
            rest = torch.where(taken, torch.full_like(p, -1.0), p)
            ranked = torch.sort(rest, descending=True, stable=True).indices[: picks - len(order)]
            order += ranked.tolist()
            covered += [covered[-1]] * len(ranked)
            break
        order.append(j)
        taken[j] = True
        torch.maximum(cover, z[:, j], out=cover)
        exact.fill_(False)
        covered.append(float(torch.dot(p.double(), cover.double())))
    return torch.tensor(order, dtype=torch.long, device=p.device), torch.tensor(covered, dtype=torch.float64)


def similarities(visual: torch.Tensor, states: torch.Tensor, sharpness: float = 16.0) -> List[torch.Tensor]:
    """``region_similarity`` of each row's visual tokens (a list: rows differ in count), to share between
    ``coverage_count`` and ``coverage_keep`` on the same states."""
    return [region_similarity(states[i, torch.nonzero(visual[i]).flatten()], sharpness) for i in range(visual.shape[0])]


def _attention(scores: torch.Tensor) -> Optional[torch.Tensor]:
    w = scores.float().clamp(min=0)
    total = float(w.sum())
    return w / total if total > 0 else None


@torch.no_grad()
def coverage_keep(scores: torch.Tensor, budget: torch.Tensor, visual: torch.Tensor, states: torch.Tensor,
                  sharpness: float = 16.0, similarity: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The ``budget[b]`` visual tokens of each row that cover most of its attention (``greedy_cover``).
    scores: (B, L) >= 0, the query's attention; budget: (B,); visual: (B, L) bool; states: (B, L, D), what
    ``region_similarity`` compares (``similarity``: those already computed, from `similarities`). Returns (B, L)
    bool, ``min(budget, visual count)`` per row; a row with no attention on its visual tokens keeps its first
    ones (as top-K would on equal scores)."""
    out = torch.zeros_like(visual)
    for i in range(scores.shape[0]):
        idx = torch.nonzero(visual[i]).flatten()
        k = min(int(budget[i]), idx.numel())
        if k <= 0:
            continue
        p = _attention(scores[i, idx])
        if p is None:
            out[i, idx[:k]] = True
            continue
        z = similarity[i] if similarity is not None else region_similarity(states[i, idx], sharpness)
        order, _ = greedy_cover(p, z, k)
        out[i, idx[order]] = True
    return out


@torch.no_grad()
def coverage_count(scores: torch.Tensor, visual: torch.Tensor, states: torch.Tensor, share: float = 0.75,
                   sharpness: float = 16.0, limit: Optional[int] = None,
                   similarity: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """How many tokens it takes to cover ``share`` of each row's attention on its visual tokens, in greedy order,
    interpolated within the last pick (so the budget moves smoothly with the attention): (B,) float32 in
    [0, visual count]; 0 for a row without visual tokens or attention on them. ``limit``: stop counting there
    (the count is then at most ``limit``: a budget clipped below ``lambda * limit`` does not need more);
    ``similarity``: as in `coverage_keep`.

    Stage 3's budget signal ``llm_budget_signal="coverage"`` (``K = llm_lambda * count``). A question about a
    global property whose attention lies on look-alike background needs one or two picks; one that attends to
    every object of a colour, one per object; the share of attention that sinks and text take does not matter."""
    out = torch.zeros(scores.shape[0], dtype=torch.float32, device=scores.device)
    for i in range(scores.shape[0]):
        idx = torch.nonzero(visual[i]).flatten()
        p = _attention(scores[i, idx]) if idx.numel() else None
        if p is None:
            continue
        cap = idx.numel() if limit is None else min(int(limit), idx.numel())
        z = similarity[i] if similarity is not None else region_similarity(states[i, idx], sharpness)
        _, covered = greedy_cover(p, z, cap, share)
        steps = covered.numel() - 1
        if covered[-1] >= share and steps > 0:  # the last pick crossed the share: the fraction of it needed
            before, after = float(covered[-2]), float(covered[-1])
            steps = steps - 1 + ((share - before) / (after - before) if after > before else 1.0)
        out[i] = steps
    return out
