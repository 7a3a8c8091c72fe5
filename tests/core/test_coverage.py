"""Stage 3 by coverage, on constructed attention and states where the right answer is known."""

import itertools

import pytest
import torch

from meteor_plugin.core.coverage import coverage_count, coverage_keep, greedy_cover, region_similarity
from meteor_plugin.core.select import topk_mask


def _scene(regions, background=10, dim=16, seed=0):
    """States of ``background`` look-alike tokens and one token per object region (all distinct directions),
    after two text tokens: (1, L, dim) states and (1, L) visual mask. Objects are tokens 2+background onwards."""
    torch.manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim))[0]
    bg = basis[0] * 3 + 0.01 * torch.randn(background, dim)  # one region, nearly identical tokens
    objects = basis[1:1 + regions] * 3
    text = torch.randn(2, dim)
    states = torch.cat([text, bg, objects])[None]
    visual = torch.tensor([[False, False] + [True] * (background + regions)])
    return states, visual


def test_region_similarity_is_one_within_a_look_alike_region_and_zero_across_distinct_ones():
    states, visual = _scene(regions=3)
    z = region_similarity(states[0, visual[0]])
    assert torch.all(z.diagonal() == 1.0)
    assert float(z[:10, :10].min()) > 0.9  # the background tokens look alike
    assert float(z[10:, 10:].clone().fill_diagonal_(0).max()) < 1e-3  # the objects do not look like each other
    # centred: a large offset shared by every token does not make them alike
    shifted = region_similarity(states[0, visual[0]] + 100.0)
    torch.testing.assert_close(shifted, z, atol=1e-3, rtol=0)
    assert torch.equal(region_similarity(torch.ones(4, 8)), torch.ones(4, 4))  # all at the mean: one region


def test_coverage_keeps_one_token_per_attended_region_where_top_k_keeps_the_background():
    """A counting question at a shallow layer: most attention on the look-alike background, a little on each of
    three objects. Top-3 keeps three background tokens (no object); coverage keeps one background token and then
    the two most attended objects, and with 4 tokens every region once."""
    states, visual = _scene(regions=3)
    scores = torch.zeros(1, 15)
    scores[0, :2] = 1.0  # text (a sink): never kept, never counted
    scores[0, 2:12] = 0.08  # background: 0.8 in all, each token more than any object
    scores[0, 12:15] = torch.tensor([0.06, 0.07, 0.05])  # three objects
    top = topk_mask(scores, torch.tensor([3]), visual)
    assert torch.nonzero(top[0]).flatten().tolist() == [2, 3, 4]  # three background tokens, no object
    for k, objects in ((3, [12, 13]), (4, [12, 13, 14])):  # background once, then the most attended objects
        kept = torch.nonzero(coverage_keep(scores, torch.tensor([k]), visual, states)[0]).flatten().tolist()
        assert len(kept) == k and len([i for i in kept if i < 12]) == 1 and kept[1:] == objects
    # Beyond one per region, the rest by attention; never more than the visual tokens.
    assert int(coverage_keep(scores, torch.tensor([6]), visual, states).sum()) == 6
    assert int(coverage_keep(scores, torch.tensor([99]), visual, states).sum()) == 13
    # A row without attention on its image keeps its first visual tokens; a batch is its rows.
    both = coverage_keep(torch.cat([scores, torch.zeros(1, 15)]), torch.tensor([3, 2]), visual.repeat(2, 1),
                         states.repeat(2, 1, 1))
    assert torch.equal(both[0], coverage_keep(scores, torch.tensor([3]), visual, states)[0])
    assert torch.nonzero(both[1]).flatten().tolist() == [2, 3]


def test_greedy_cover_follows_the_facility_location_gains():
    """Each pick adds the most covered attention, ``sum_i p_i max_{j kept} z_ij``, checked by brute force."""
    torch.manual_seed(3)
    states = torch.randn(9, 6)
    z = region_similarity(states, sharpness=2.0)
    p = torch.rand(9)
    p /= p.sum()
    order, covered = greedy_cover(p, z, 5)

    def value(kept):
        return float((p * z[:, list(kept)].max(dim=1).values).sum()) if kept else 0.0

    kept = []
    for step, j in enumerate(order.tolist()):
        best = max((value(kept + [c]), -c) for c in range(9) if c not in kept)
        assert j == -best[1] and covered[step + 1] == pytest.approx(best[0], abs=1e-6)
        kept.append(j)
    # Submodular: the greedy set of 3 is within 1 - 1/e of the best set of 3.
    optimum = max(value(list(c)) for c in itertools.combinations(range(9), 3))
    assert value(order[:3].tolist()) >= (1 - 1 / 2.718281828) * optimum
    # With a share, it stops as soon as that share is covered.
    order, covered = greedy_cover(p, z, 9, share=0.5)
    assert covered[-1] >= 0.5 and (covered.numel() == 2 or covered[-2] < 0.5)


def test_coverage_count_is_the_tokens_needed_for_a_share_of_the_attention():
    """The global question (attention over the look-alike background) needs one token; a question attending
    equally to m distinct objects needs 0.75 * m of them for 75% of its attention."""
    states, visual = _scene(regions=8)
    rows = []
    glob = torch.zeros(20)
    glob[0] = 5.0  # a sink outside the image: the share it takes does not matter
    glob[2:12] = 0.1
    rows.append(glob)
    for m in (1, 2, 4, 8):
        row = torch.zeros(20)
        row[12:12 + m] = 1.0 / m
        rows.append(row)
    scores = torch.stack(rows)
    count = coverage_count(scores, visual.repeat(5, 1), states.repeat(5, 1, 1), share=0.75)
    assert float(count[0]) <= 1.0
    torch.testing.assert_close(count[1:], torch.tensor([0.75, 1.5, 3.0, 6.0]), atol=1e-4, rtol=0)
    # Monotone in the share; capped by ``limit``; no attention on the image: 0.
    assert bool((coverage_count(scores, visual.repeat(5, 1), states.repeat(5, 1, 1), share=0.9) >= count).all())
    assert float(coverage_count(scores[4:], visual, states, share=0.75, limit=2)[0]) == 2.0
    assert float(coverage_count(torch.zeros(1, 20), visual, states)[0]) == 0.0
