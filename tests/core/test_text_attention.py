import torch

import pytest

from meteor_plugin.core.text_attention import (apply_rope, attended_regions, attention_spread, mean_query_attention,
                                               select_heads)


def test_mean_query_attention_equals_dense_causal_softmax_rows():
    torch.manual_seed(0)
    b, h, hkv, length, d = 2, 4, 2, 9, 8
    q_all = torch.randn(b, h, length, d)
    k = torch.randn(b, hkv, length, d)
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[1, 7:] = False  # padding at the end of sample 1
    q_index = torch.tensor([[5, 8, 0], [3, 6, 0]])
    q_valid = torch.tensor([[True, True, False], [True, True, False]])
    q = torch.stack([q_all[i][:, q_index[i]] for i in range(b)])
    out = mean_query_attention(q, k, q_index, q_valid, key_valid, scale=d ** -0.5, chunk=1)
    kr = k.repeat_interleave(h // hkv, dim=1)
    for i in range(b):
        logits = q_all[i] @ kr[i].transpose(-1, -2) * d ** -0.5
        causal = torch.ones(length, length).tril().bool() & key_valid[i][None]
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        expected = probs[:, q_index[i][q_valid[i]]].mean(dim=1)
        torch.testing.assert_close(out[i], expected)
    # A key bias is added to every query's logits (proportional attention's log sizes), in chunks of any size.
    bias = torch.randn(b, length)
    biased = mean_query_attention(q, k, q_index, q_valid, key_valid, scale=d ** -0.5, chunk=2, key_bias=bias)
    for i in range(b):
        logits = q_all[i] @ kr[i].transpose(-1, -2) * d ** -0.5 + bias[i]
        causal = torch.ones(length, length).tril().bool() & key_valid[i][None]
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(biased[i], probs[:, q_index[i][q_valid[i]]].mean(dim=1))


def test_select_heads_picks_highest_visual_attention_and_sums_their_mass():
    attn = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.0, 0.1, 0.9]]])  # (1, 3 heads, 3 tokens)
    visual = torch.tensor([[False, True, True]])
    rel = select_heads(attn, visual, top_heads=2)
    assert rel.heads.tolist() == [[True, False, True]]
    torch.testing.assert_close(rel.mass, torch.tensor([0.9 + 1.0]))
    torch.testing.assert_close(rel.scores, torch.tensor([[0.05, 0.35, 0.6]]))



def test_attention_spread_grows_with_the_number_of_regions_attended():
    visual = torch.tensor([[False] + [True] * 16] * 3)
    scores = torch.zeros(3, 17)
    scores[:, 0] = 0.7  # a sink outside the image: it does not count
    scores[0, 3] = 0.3  # one region
    scores[1, [3, 9]] = 0.15  # two
    scores[2, 1:] = 0.3 / 16  # the whole image
    spread = attention_spread(scores, visual)
    torch.testing.assert_close(spread, torch.tensor([1.0, 2.0, 16.0]))
    # Independent of the mass on the image (the sink can take any share), unlike the paper's signal.
    torch.testing.assert_close(attention_spread(scores * torch.tensor([[1.0], [0.1], [3.0]]), visual), spread)
    assert attention_spread(torch.zeros(1, 17), visual[:1]).item() == pytest.approx(0.0)


def _regions_image(regions=6, per_region=8, dim=32, seed=0):
    """Visual tokens in ``regions`` groups of ``per_region`` look-alike tokens (a shared direction plus a little
    noise), after two text tokens; hidden (1, L, D) and the visual mask (1, L)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:regions] * 10  # orthogonal regions
    tokens = centres.repeat_interleave(per_region, dim=0) + 0.05 * torch.randn(regions * per_region, dim, generator=g)
    hidden = torch.cat([torch.randn(2, dim, generator=g), tokens])[None]
    visual = torch.zeros(1, hidden.shape[1], dtype=torch.bool)
    visual[0, 2:] = True
    return hidden, visual


def test_attended_regions_counts_look_alike_tokens_once_and_grows_with_the_regions_attended():
    hidden, visual = _regions_image(regions=6, per_region=8)
    counts = []
    for r in range(1, 7):  # attention spread evenly over every token of the first r regions
        scores = torch.zeros(1, visual.shape[1])
        scores[0, 2:2 + 8 * r] = 1.0
        counts.append(attended_regions(scores, visual, hidden).item())
    assert counts == sorted(counts) and counts[0] == pytest.approx(1.0, abs=0.05)
    # centred on their mean, orthogonal regions are 120 degrees or more apart: each one counts fully
    assert all(abs(c - r) < 0.1 for r, c in zip(range(1, 7), counts))
    # the same 8 tokens of one region against 8 tokens from 8 different regions: one region against eight
    spread_hidden, _ = _regions_image(regions=8, per_region=1, seed=1)
    hidden8 = torch.cat([hidden, spread_hidden[:, 2:]], dim=1)
    visual8 = torch.ones(1, hidden8.shape[1], dtype=torch.bool)
    visual8[0, :2] = False
    one, eight = torch.zeros(1, hidden8.shape[1]), torch.zeros(1, hidden8.shape[1])
    one[0, 2:10], eight[0, -8:] = 1.0, 1.0
    assert attended_regions(one, visual8, hidden8).item() < 1.1 < 6.0 < attended_regions(eight, visual8, hidden8).item()
    # the token-counting perplexity sees 8 in both
    torch.testing.assert_close(attention_spread(one, visual8), attention_spread(eight, visual8))


def test_attended_regions_edge_cases():
    hidden, visual = _regions_image(regions=2, per_region=4)
    assert attended_regions(torch.zeros(1, visual.shape[1]), visual, hidden).item() == 0.0  # no attention
    same = torch.ones(1, 10, 8)  # every visual token identical: one region, however spread the attention
    visual_same = torch.ones(1, 10, dtype=torch.bool)
    assert attended_regions(torch.rand(1, 10), visual_same, same).item() == pytest.approx(1.0)
    scores = torch.rand(1, visual.shape[1])
    torch.testing.assert_close(attended_regions(scores * 7.0, visual, hidden), attended_regions(scores, visual, hidden))
    sharp = attended_regions(scores, visual, hidden, sharpness=64.0)
    assert sharp.item() >= attended_regions(scores, visual, hidden, sharpness=1.0).item()  # sharper: fewer alike


def test_apply_rope_equals_the_rotate_half_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)  # (B, H, T, d) as a strided view, as the projections give it
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    rotated = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    expected = x * cos[:, None] + rotated * sin[:, None]
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-6)
    # With a gradient wanted the same values come from the differentiable path, and the gradient flows.
    xg = x.detach().clone().requires_grad_(True)
    out = apply_rope(xg, cos, sin)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert torch.allclose(xg.grad, (cos + torch.cat((sin[..., 4:], -sin[..., :4]), dim=-1))[:, None].expand_as(x))


@pytest.mark.parametrize("sharpness", [1.0, 2.0, 3.0, 16.0, 7.5, 64.0])
def test_attended_regions_matches_the_dense_formula_for_whole_and_fractional_sharpness(sharpness):
    torch.manual_seed(1)
    hidden = torch.randn(1, 300, 16)  # more rows than one block of the blockwise sum
    visual = torch.ones(1, 300, dtype=torch.bool)
    scores = torch.rand(1, 300)
    x = hidden[0] - hidden[0].mean(dim=0)
    x = x / x.norm(dim=-1, keepdim=True)
    z = (x @ x.T).clamp(min=0, max=1) ** sharpness
    z.fill_diagonal_(1.0)
    p = scores[0] / scores[0].sum()
    expected = 1.0 / float(p @ z @ p)
    assert attended_regions(scores, visual, hidden, sharpness).item() == pytest.approx(expected, rel=1e-5)
    # The same visual tokens among text rows, in one run and scattered (two images, say): the same count.
    text = torch.randn(1, 40, 16)
    for where in (torch.arange(20, 320), torch.cat((torch.arange(5, 155), torch.arange(180, 330)))):
        mixed = torch.zeros(1, 340, 16)
        mixed_scores = torch.rand(1, 340) * 5  # text rows' scores are not counted
        is_visual = torch.zeros(1, 340, dtype=torch.bool)
        is_visual[0, where] = True
        mixed[0, where], mixed_scores[0, where] = hidden[0], scores[0]
        mixed[0, ~is_visual[0]] = text[0]
        assert attended_regions(mixed_scores, is_visual, mixed, sharpness).item() == pytest.approx(expected, rel=1e-5)
