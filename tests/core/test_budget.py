import pytest
import torch

from meteor_plugin.core.budget import adaptive_keep, cap_budgets, rank_budgets, resolve_budget, resolve_budget_per_sample


def test_counts_and_ratios_resolve_against_entering_tokens():
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(200, 100) == 100
    assert resolve_budget(1.0, 7) == 7
    assert resolve_budget_per_sample(0.5, torch.tensor([10, 3, 0])).tolist() == [5, 2, 0]
    assert resolve_budget_per_sample(4, torch.tensor([10, 3])).tolist() == [4, 3]


def test_adaptive_keep_scales_mass_and_clips_per_sample():
    mass = torch.tensor([0.1, 1.0, 5.0, 2.0])
    available = torch.tensor([64, 64, 64, 0])
    k = adaptive_keep(mass, 10.0, available, min_keep=4, max_keep=0.5)
    assert k.tolist() == [4, 10, 32, 0]


def test_adaptive_keep_max_wins_when_a_count_and_a_ratio_cross():
    k = adaptive_keep(torch.tensor([0.0]), 1.0, torch.tensor([20]), min_keep=16, max_keep=0.5)
    assert k.tolist() == [10]


@pytest.mark.parametrize("total,ranks,expected", [
    (100, [1.0, 1.0, 2.0], [25, 25, 50]),
    (10, [1.0, 1.0, 1.0], [4, 3, 3]),  # the remainder goes to the lower index
    (12, [0.0, 3.0, 1.0], [0, 9, 3]),  # rank 0 gets nothing
    (9, [None, 5.0, 1.0], [3, 3, 3]),  # a missing rank means uniform
    (8, [0.0, 0.0], [4, 4]),
])
def test_rank_budgets_are_proportional_and_sum_to_the_total(total, ranks, expected):
    shares = rank_budgets(total, ranks)
    assert shares == expected
    assert sum(shares) == total


def test_rank_budgets_reject_negative_ranks():
    with pytest.raises(ValueError, match="ranks"):
        rank_budgets(10, [1.0, -2.0])


def test_cap_budgets_moves_excess_to_encoders_with_room():
    assert cap_budgets([50, 30, 20], [10, 100, 100]) == [10, 54, 36]
    assert sum(cap_budgets([5, 5], [3, 3])) == 6
