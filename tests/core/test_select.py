import torch

from meteor_plugin.core.select import bottomk_mask, compaction_index, gather_tokens, topk_mask


def test_topk_breaks_ties_by_lower_index_and_respects_per_row_budgets():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    mask = topk_mask(scores, torch.tensor([2, 3]), valid)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, True, False, False]]


def test_topk_never_selects_invalid_entries_even_with_a_large_budget():
    scores = torch.tensor([[9.0, 1.0, 8.0, 7.0]])
    valid = torch.tensor([[False, True, True, False]])
    assert topk_mask(scores, torch.tensor([4]), valid).tolist() == [[False, True, True, False]]


def test_bottomk_selects_lowest_scores():
    scores = torch.tensor([[0.3, -1.0, 0.2, 0.9]])
    assert bottomk_mask(scores, torch.tensor([2]), torch.ones(1, 4, dtype=torch.bool)).tolist() == [
        [False, True, True, False]
    ]


def test_compaction_keeps_order_and_pads_on_the_requested_side():
    keep = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    index, valid = compaction_index(keep)
    assert index.tolist() == [[0, 2, 3], [1, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    index, valid = compaction_index(keep, align_right=True)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]


def test_gather_tokens_broadcasts_a_shared_batch_dimension():
    x = torch.arange(10.0).view(1, 5, 2)
    index = torch.tensor([[4, 0], [1, 2]])
    out = gather_tokens(x, index)
    assert out.tolist() == [[[8.0, 9.0], [0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]]]


def test_floor_count_rounds_keeps_one_and_never_takes_the_whole_budget():
    from meteor_plugin.core.select import floor_count

    assert floor_count(0.25, 52) == 13
    assert floor_count(0.25, 3) == 1  # at least one while the share is positive
    assert floor_count(0.5, 2) == 1 and floor_count(0.5, 1) == 1
    assert floor_count(0.0, 52) == 0 and floor_count(0.25, 0) == 0


def test_spread_positions_are_evenly_spaced_over_the_grid():
    from meteor_plugin.core.select import spread

    assert torch.nonzero(spread(16, 4)).flatten().tolist() == [2, 6, 10, 14]
    assert torch.nonzero(spread(5, 5)).flatten().tolist() == [0, 1, 2, 3, 4]
    assert spread(5, 9).sum() == 5 and spread(7, 0).sum() == 0


def test_owner_spread_shares_the_floor_by_token_count_and_spreads_within_each_encoder():
    from meteor_plugin.core.select import owner_spread

    owner = torch.tensor([0] * 4 + [1] * 12)
    picked = owner_spread(owner, 8)
    assert torch.nonzero(picked).flatten().tolist() == [1, 3, 5, 7, 9, 11, 13, 15]  # 2 of 4, 6 of 12
    # Exactly m in all, by largest remainders: 4 owners of 3 tokens share 2 positions, the first two get one.
    four = owner_spread(torch.arange(4).repeat_interleave(3), 2)
    assert four.sum() == 2 and torch.nonzero(four).flatten().tolist() == [1, 4]
    assert owner_spread(torch.tensor([0] * 30 + [1] * 2), 9)[30:].sum() == 1  # quotas 8.44 and 0.56: 8 and 1


def test_topk_beyond_keeps_the_reserved_and_fills_the_rest_by_score():
    from meteor_plugin.core.select import topk_beyond

    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5]])
    reserved = torch.tensor([False, False, False, False, False, True])
    valid = torch.ones(2, 6, dtype=torch.bool)
    mask = topk_beyond(scores, torch.tensor([3, 2]), reserved, valid)
    assert mask.tolist() == [[True, True, False, False, False, True], [False, False, False, False, True, True]]
    assert torch.equal(topk_beyond(scores, torch.tensor([3, 2]), torch.zeros(6, dtype=torch.bool), valid),
                       topk_mask(scores, torch.tensor([3, 2]), valid))
