import torch

import pytest

from meteor_plugin.core.text_attention import attention_spread, mean_query_attention, select_heads


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
