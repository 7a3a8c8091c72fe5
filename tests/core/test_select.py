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
