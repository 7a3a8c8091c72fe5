import torch

import pytest

from meteor_plugin.core.rank import effective_rank, encoder_rank, numerical_rank
from meteor_plugin.core.select import bottomk_mask
from meteor_plugin.core.token_scores import (centre_per_owner, cooperative_redundancy, cross_owner_similarity,
                                             duplicate_aware_mask, similarity_to_mean)


def test_similarity_to_mean_is_cosine_to_the_average_token():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mean = x.mean(dim=1)[0]
    expected = torch.stack([torch.nn.functional.cosine_similarity(t, mean, dim=0) for t in x[0]])
    torch.testing.assert_close(similarity_to_mean(x)[0], expected)


def test_cooperative_redundancy_matches_brute_force_and_selection_keeps_the_lowest():
    torch.manual_seed(0)
    b, counts, d = 2, [5, 3, 4], 6
    z = torch.randn(b, sum(counts), d)
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(counts)])
    alive = torch.rand(b, sum(counts)) > 0.2
    r = cooperative_redundancy(z, owner, alive)
    for s in range(b):
        for i in range(sum(counts)):
            ref = sum(torch.nn.functional.cosine_similarity(z[s, i], z[s, m], dim=0)
                      for m in range(sum(counts)) if owner[m] != owner[i] and alive[s, m])
            torch.testing.assert_close(r[s, i], torch.as_tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    keep = bottomk_mask(r, torch.tensor([4, 4]), torch.ones_like(alive))
    for s in range(b):
        brute = sorted(range(sum(counts)), key=lambda i: (float(r[s, i]), i))[:4]
        assert sorted(torch.nonzero(keep[s]).flatten().tolist()) == sorted(brute)


def test_centred_redundancy_is_the_cosine_after_removing_each_encoders_alive_mean():
    torch.manual_seed(1)
    counts, d = [4, 5], 3
    z = torch.randn(2, sum(counts), d)
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(counts)])
    alive = torch.rand(2, sum(counts)) > 0.3
    alive[:, 0] = alive[:, 4] = True
    centred = centre_per_owner(z, owner, alive)
    for s in range(2):
        for j in range(len(counts)):
            cols = (owner == j) & alive[s]
            torch.testing.assert_close(centred[s, owner == j], z[s, owner == j] - z[s, cols].mean(dim=0))
    torch.testing.assert_close(cooperative_redundancy(z, owner, alive, centred=True),
                               cooperative_redundancy(centred, owner, alive))


def test_centring_removes_the_encoders_offsets_that_an_uncentred_cosine_measures():
    # Two encoders see the same two objects (a, b) on a flat background (g), each through its own large
    # offset. Uncentred, the cross-encoder cosines mostly measure the offsets: the background tokens look
    # least redundant and are what the lowest-R selection keeps. Centred, the background tokens (the
    # common content of both encoders) are the redundant ones and the objects are kept.
    a, b, g = torch.tensor([4.0, 0, 0, 0]), torch.tensor([0, 4.0, 0, 0]), torch.zeros(4)
    first = torch.stack([a, b, g, g, g, g]) + torch.tensor([0, 0, 20.0, 0])
    second = torch.stack([a, b, g, g, g, g]) + torch.tensor([0, 0, 0, 20.0])
    z = torch.cat([first, second]).unsqueeze(0)
    owner = torch.tensor([0] * 6 + [1] * 6)
    plain = cooperative_redundancy(z, owner)[0]
    centred = cooperative_redundancy(z, owner, centred=True)[0]
    objects = torch.tensor([0, 1, 6, 7])
    background = torch.tensor([2, 3, 4, 5, 8, 9, 10, 11])
    assert centred[objects].max() < centred[background].min()
    assert plain[objects].min() > plain[background].max()


def test_numerical_rank_counts_independent_directions():
    basis = torch.randn(3, 8)
    low_rank = torch.randn(2, 10, 3) @ basis  # rank 3
    assert numerical_rank(low_rank).tolist() == [3.0, 3.0]
    assert numerical_rank(torch.randn(12, 5)).tolist() == [5.0]



def test_effective_rank_separates_structure_from_noise_where_numerical_rank_saturates():
    torch.manual_seed(0)
    n, c = 64, 48
    # An encoder that sees structure: every token is a mix of 4 patterns plus a common offset and faint noise.
    structured = torch.randn(2, n, 4) @ torch.randn(4, c) + 5.0 + 0.01 * torch.randn(2, n, c)
    noise = torch.randn(2, n, c)
    assert numerical_rank(structured).tolist() == numerical_rank(noise).tolist() == [48.0, 48.0]
    eff_s, eff_n = effective_rank(structured), effective_rank(noise)
    assert (eff_s < 6).all() and (eff_n > 30).all()
    # Three equal singular values of already-centred tokens: an effective rank of exactly 3.
    raw = torch.randn(n, 3)
    tokens, _ = torch.linalg.qr(raw - raw.mean(dim=0))  # centred orthonormal columns
    channels, _ = torch.linalg.qr(torch.randn(c, 3))
    assert effective_rank(tokens @ channels.T).item() == pytest.approx(3.0, abs=1e-4)
    assert encoder_rank(noise, "numerical").tolist() == [48.0, 48.0]
    with pytest.raises(ValueError, match="rank measure 'hrank' is invalid"):
        encoder_rank(noise, "hrank")


def test_duplicate_aware_stage2_keeps_one_of_two_duplicates_and_both_of_two_different_tokens():
    # Encoder 0: tokens 0-3; encoder 1: tokens 4-7. Backgrounds near each encoder's own offset; the object
    # "A" is seen by both encoders (tokens 1 and 5 carry the same content); "B" (token 2) and "C" (token 6)
    # are seen by one encoder each.
    d = 8
    e = torch.eye(d)
    off0, off1 = 3 * e[0], -3 * e[1]
    bg = 0.05 * e[7]
    z = torch.stack([off0 + bg, off0 + 2 * e[2], off0 + 2 * e[3], off0 - bg,
                     off1 + bg, off1 + 2 * e[2], off1 + 2 * e[4], off1 - bg]).unsqueeze(0)
    owner = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    kept = duplicate_aware_mask(z, owner, 3)[0]
    assert kept.sum() == 3
    assert kept[[2, 6]].all()  # what only one encoder sees is kept
    assert int(kept[1]) + int(kept[5]) == 1  # the shared object once
    assert not kept[[0, 3, 4, 7]].any()  # no background while content is left
    # With room for four the second copy of A comes in before any background (which has almost no importance).
    assert duplicate_aware_mask(z, owner, 4)[0][[1, 2, 5, 6]].all()
    # Exact count per row on a batch; the plain cosine kept background here.
    batch = torch.cat([z, z.flip(1)])
    masks = duplicate_aware_mask(batch, owner, 5)
    assert masks.sum(dim=1).tolist() == [5, 5]
    plain = bottomk_mask(cooperative_redundancy(z, owner), torch.tensor([3]), torch.ones(1, 8, dtype=torch.bool))[0]
    assert plain[[0, 3, 4, 7]].any()


def test_a_spread_floor_keeps_look_alike_background_that_the_scores_alone_drop():
    # Two encoders over 4x4 grids: background tokens are near copies of each other, four objects are distinctive.
    # Stage 2's scores keep objects first and no background; with the floor, its reserved tokens are kept and
    # count as kept for redundancy, and the rest still goes to the objects.
    from meteor_plugin.core.select import owner_spread
    from meteor_plugin.stages.fusion import cooperative_prune

    torch.manual_seed(0)
    d = 16
    owner = torch.tensor([0] * 16 + [1] * 16)
    z = torch.randn(1, 32, d) * 0.01 + torch.where(owner == 0, 1.0, -1.0).view(1, -1, 1) * torch.eye(d)[0]
    objects = [3, 9, 20, 30]
    for n, i in enumerate(objects):
        z[0, i] += 3 * torch.eye(d)[2 + n]
    background = [i for i in range(32) if i not in objects]
    reserved = torch.nonzero(owner_spread(owner, 2)).flatten().tolist()  # one per encoder
    assert set(reserved) <= set(background)
    _, plain = cooperative_prune(z, owner, 4, "duplicate")
    assert sorted(plain[0].tolist()) == objects  # the scores alone keep no background
    for similarity in ("duplicate", "cosine", "centred_cosine"):
        _, floored = cooperative_prune(z, owner, 4, similarity, spread_floor=0.5)
        assert set(reserved) <= set(floored[0].tolist()) and len(floored[0]) == 4
    _, floored = cooperative_prune(z, owner, 4, "duplicate", spread_floor=0.5)
    assert len(set(floored[0].tolist()) & set(objects)) == 2  # the rest still goes to objects
    mask = duplicate_aware_mask(z, owner, 4, owner_spread(owner, 2))[0]
    assert torch.nonzero(mask).flatten().tolist() == sorted(floored[0].tolist())


def test_stage2_greedy_on_the_cpu_picks_what_the_tensor_greedy_picks(monkeypatch):
    # The CPU path runs the greedy in numpy (dispatch-bound otherwise); accelerators run it as tensor ops.
    # Both must keep exactly the same tokens: random tokens, duplicates across encoders, exact ties
    # (identical tokens within an encoder), reserved tokens, a batch whose rows differ.
    from meteor_plugin.core import token_scores

    g = torch.Generator().manual_seed(0)
    owner = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)
    z = torch.randn(3, 100, 16, generator=g)
    z[:, 40] = z[:, 5]  # the same content seen by encoders 0 and 1
    z[:, 90] = z[:, 41]
    z[:, 10:14] = z[:, 9:10]  # look-alike tokens of one encoder: equal importance, the tie-break decides
    reserved = torch.zeros(100, dtype=torch.bool)
    reserved[[0, 35, 85]] = True
    ran = []
    numpy_greedy, tensor_greedy = token_scores._greedy_numpy, token_scores._greedy_tensor
    monkeypatch.setattr(token_scores, "_greedy_numpy", lambda *a: ran.append("numpy") or numpy_greedy(*a))
    cpu = duplicate_aware_mask(z, owner, 40, reserved)
    cpu_quota = duplicate_aware_mask(z, owner, 40, reserved, quota=[10, 25, 5])
    monkeypatch.setattr(token_scores, "_greedy_numpy", lambda *a: ran.append("tensor") or tensor_greedy(*a))
    tensor = duplicate_aware_mask(z, owner, 40, reserved)
    assert ran == ["numpy", "numpy", "tensor"]
    assert torch.equal(cpu, tensor)
    assert torch.equal(cpu_quota, duplicate_aware_mask(z, owner, 40, reserved, quota=[10, 25, 5]))
    assert [int(cpu_quota[0, owner == j].sum()) for j in range(3)] == [10, 25, 5]
    assert cpu.sum(dim=1).tolist() == [40, 40, 40] and cpu[:, reserved].all()
    assert not torch.equal(cpu[0], cpu[1])  # the rows were chosen each on its own
    # Inputs that carry gradients (Stage 2 active in training) select without them.
    grad = z.clone().requires_grad_(True)
    assert torch.equal(duplicate_aware_mask(grad, owner, 40, reserved), cpu)


def test_stage2_rank_quotas_give_each_encoder_its_share_and_select_within_it():
    # fusion_quota="rank": encoder 0 (rank 3) and encoder 1 (rank 1) share 8 kept tokens 6:2, whatever the
    # scores; without quotas the same tokens split by the scores alone. Within a share, the greedy's order.
    from meteor_plugin.core.budget import bounded_shares
    from meteor_plugin.stages.fusion import cooperative_prune

    g = torch.Generator().manual_seed(1)
    owner = torch.tensor([0] * 12 + [1] * 20)
    z = torch.randn(2, 32, 8, generator=g)
    z[:, 12:] *= 4  # encoder 1's tokens stand out: alone, the scores give it most of the budget
    for similarity in ("duplicate", "cosine", "centred_cosine"):
        _, free = cooperative_prune(z, owner, 8, similarity)
        _, shared = cooperative_prune(z, owner, 8, similarity, quota_ranks=[3.0, 1.0])
        assert (owner[shared] == 0).sum(dim=1).tolist() == [6, 6], similarity
        assert (owner[free] == 0).sum(dim=1).tolist() != [6, 6], similarity
        # a spread floor's reserved tokens count toward their encoder's share
        _, floored = cooperative_prune(z, owner, 8, similarity, spread_floor=0.5, quota_ranks=[3.0, 1.0])
        assert (owner[floored] == 0).sum(dim=1).tolist() == [6, 6], similarity
    # Within its share an encoder keeps what the greedy ranks first: quota 8:0 is encoder 0's top 8 alone.
    only = duplicate_aware_mask(z, owner, 8, quota=[8, 0])
    assert only[:, 12:].sum() == 0 and only.sum(dim=1).tolist() == [8, 8]
    assert torch.equal(only[:, :12], duplicate_aware_mask(z[:, :12], owner[:12], 8))
    for wrong in ([4, 3], [4, 2, 2], [8]):  # not summing to keep; not one share per encoder
        with pytest.raises(ValueError, match="quota"):
            duplicate_aware_mask(z, owner, 8, quota=wrong)
    # Shares stay within [reserved, available] and sum to the total.
    assert bounded_shares(10, [1.0, 1.0, 8.0], [3, 0, 0], [20, 20, 4]) == [3, 3, 4]
    assert bounded_shares(6, [1.0, 0.0], [0, 2], [6, 6]) == [4, 2]
    with pytest.raises(ValueError, match="total"):
        bounded_shares(3, [1.0, 1.0], [2, 2], [5, 5])


@pytest.mark.parametrize("owner", [[0] * 5 + [1] * 3 + [2] * 4, [0, 0, 1, 1, 0, 2, 2, 1, 0, 2, 1, 1], [3] * 6 + [1] * 6])
def test_cross_owner_similarity_equals_the_masked_full_product(owner):
    torch.manual_seed(3)
    owner = torch.tensor(owner)
    u = torch.nn.functional.normalize(torch.randn(2, len(owner), 16), dim=-1)
    full = (u @ u.transpose(1, 2)).clamp(min=0) * (owner[:, None] != owner[None, :])
    assert torch.allclose(cross_owner_similarity(u, owner), full, atol=1e-6)
