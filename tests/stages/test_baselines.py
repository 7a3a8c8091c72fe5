"""Baselines as plugin methods: exact budgets per sample, and what each keeps."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.stages.baselines import (EncoderTokens, avgpool_keep, drop_encoder_keep, keep_each, placed, pooled_rows,
                                            random_keep, random_rows, select, visionzip_keep, visionzip_rows)
from meteor_plugin.testing.eagle_like import build_tiny_eagle
from meteor_plugin.testing.llava import make_batch


def test_avgpool_pools_each_grid_and_splits_the_budget_by_token_count():
    a = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid
    b = torch.zeros(1, 4, 1)  # a 2x2 grid
    out = avgpool_keep([EncoderTokens(a, grid=4), EncoderTokens(b, grid=2)], keep=5)
    assert out.shape == (1, 5, 1)
    assert out[0, :4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 means of the 4x4 grid
    assert out[0, 4, 0].item() == 0.0


def test_baseline_rows_equal_the_shared_baselines():
    """The baselines as mixes of one image's tokens (so that each kept token's place is known: Qwen-VL's positions,
    LLaVA-NeXT's crop grids) give the tokens the batch functions give (random's draw, square avgpool, VisionZip)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(36, 8, generator=g)
    importance = torch.rand(36, generator=g)
    rows, anchors = random_rows(36, 9, seed=3)
    assert torch.equal(rows @ feats, random_keep(feats[None], 9, 3)[0]) and torch.equal(feats[anchors], rows @ feats)
    rows, _ = pooled_rows(6, 6, 7)
    torch.testing.assert_close(rows @ feats, avgpool_keep([EncoderTokens(feats[None], grid=6)], 7)[0])
    rows, anchors = visionzip_rows(feats, importance, 10)
    reference = visionzip_keep([EncoderTokens(feats[None], importance=importance[None])], 10)[0]
    torch.testing.assert_close(rows @ feats, reference)
    assert anchors.shape == (10,) and len(set(anchors.tolist())) == 10


@pytest.mark.parametrize("method", ["random", "avgpool", "visionzip"])
def test_keep_each_keeps_the_budget_of_every_input_at_distinct_places(method):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 36, 8, generator=g)
    kept, anchors = keep_each(method, tokens, 7, (6, 6), torch.rand(3, 36, generator=g), seed=2)
    assert kept.shape == (3, 7, 8) and anchors.shape == (3, 7)
    assert all(len(set(a.tolist())) == 7 and 0 <= min(a.tolist()) and max(a.tolist()) < 36 for a in anchors)
    if method == "random":  # each input its own draw, each kept token the token at its place
        assert torch.equal(kept, torch.gather(tokens, 1, anchors[..., None].expand(-1, -1, 8)))
        assert not torch.equal(anchors[0], anchors[1])


def test_random_is_seeded_and_differs_per_image():
    x = torch.arange(40.0).view(2, 20, 1)
    one, two = random_keep(x, 5, seed=3), random_keep(x, 5, seed=3)
    assert torch.equal(one, two) and one.shape == (2, 5, 1)
    assert not torch.equal(one[0], one[1] - 20)  # each image draws its own positions
    assert not torch.equal(random_keep(x, 5, seed=4), one)


def test_visionzip_keeps_the_most_important_and_merges_the_rest():
    tokens = torch.randn(1, 64, 8)
    importance = torch.arange(64.0).unsqueeze(0)
    out = visionzip_keep([EncoderTokens(tokens, importance=importance)], keep=16)
    assert out.shape == (1, 16, 8)
    dominant = 16 - round(16 * 10 / 64)
    torch.testing.assert_close(out[0, :dominant], tokens[0, 64 - dominant:])
    merged_mean = out[0, dominant:].mean()
    assert torch.isfinite(merged_mean)


def test_drop_encoder_removes_one_encoder_and_refuses_an_impossible_budget():
    a, b = torch.zeros(1, 9, 1), torch.ones(1, 16, 1)
    out = drop_encoder_keep([EncoderTokens(a), EncoderTokens(b)], keep=8, drop=0)
    assert out.shape == (1, 8, 1) and bool((out == 1).all())
    with pytest.raises(ValueError, match="only 9 remain without encoder 1"):
        drop_encoder_keep([EncoderTokens(a), EncoderTokens(b)], keep=12, drop=1)
    with pytest.raises(ValueError, match="drop_encoder=5 is invalid: allowed 0..1"):
        drop_encoder_keep([EncoderTokens(a), EncoderTokens(b)], keep=4, drop=5)


@pytest.mark.parametrize("method", ["random", "avgpool", "visionzip", "drop_encoder"])
def test_every_pre_llm_method_returns_exactly_its_budget_per_sample(method):
    from meteor_plugin.adapters.eagle import convert_to_post_projection

    model = build_tiny_eagle()
    convert_to_post_projection(model)
    ids, mask, images = make_batch([(3, 5), (2, 9)], [True, True], image_size=128, seed=1)
    lengths = []
    model.get_model().layers[0].register_forward_pre_hook(
        lambda m, a, kw: lengths.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    meteor_plugin.enable(method=method, drop_encoder=1, fusion_keep=100, llm=False)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    assert lengths == [int(mask.sum(1).max()) - 1 + 100]
    for sample in meteor_plugin.stats(model).stages:
        assert (sample["baseline"].entered, sample["baseline"].left) == (3648, 100)
        assert sample["baseline"].detail["method"] == method


def test_pre_llm_baselines_on_llava_and_fastv_in_the_llm(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 5), (2, 9)], [True, True], seed=2)
    for method in ("random", "avgpool", "visionzip"):
        meteor_plugin.enable(method=method, fusion_keep=16, llm=False)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, images=images)
        assert [(s["baseline"].entered, s["baseline"].left) for s in meteor_plugin.stats(model).stages] == [(64, 16)] * 2
    meteor_plugin.enable(method="fastv", encoder=False, llm=True, llm_max_keep=20, llm_lambda=1000.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    run = meteor_plugin.stats(model)
    assert [s["llm"].left for s in run.stages] == [20, 20]
    assert all(len(s["llm"].detail["heads"]) == 4 for s in run.stages)  # every head
    assert all(s["llm"].detail["query_tokens"] == 1 for s in run.stages)  # the last instruction token


def _two_encoders(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncoderTokens(torch.randn(batch, 16, 8, generator=g), grid=4, importance=torch.rand(batch, 16, generator=g)),
            EncoderTokens(torch.randn(batch, 36, 8, generator=g), grid=6)]


@pytest.mark.parametrize("method", ["random", "visionzip", "drop_encoder"])
def test_placed_baselines_keep_the_same_tokens_and_say_where_they_sit_and_what_they_stand_for(method):
    """Under proportional attention a baseline keeps what it keeps without it, and each kept token gets its place
    among the joined tokens (the token it is, or merges into) and its size: every entering token counted once."""
    encoders = _two_encoders()
    drop = 0 if method == "drop_encoder" else None
    kept, where, sizes = placed(method, encoders, 12, seed=5, drop=drop)
    torch.testing.assert_close(kept, select(method, encoders, 12, seed=5, drop=drop))
    joined = torch.cat([e.tokens for e in encoders], dim=1)
    assert where.shape == sizes.shape == (2, 12)
    for b in range(2):
        assert len(set(where[b].tolist())) == 12 and 0 <= int(where[b].min()) and int(where[b].max()) < 52
    assert torch.equal(sizes.sum(dim=1), torch.full((2,), 52.0))  # the 52 entering tokens, each counted once
    assert bool((sizes >= 1).all())
    if method != "visionzip":  # a kept token is the token at its place
        assert torch.equal(kept, torch.stack([joined[b, where[b]] for b in range(2)]))
    if method == "drop_encoder":
        assert bool((where >= 16).all())  # nothing kept of the dropped encoder (its 16 tokens come first)
    if method == "visionzip":  # the dominant tokens stand for themselves, the contextual ones for their merges
        assert sizes[:, :10].eq(1).all() and bool((sizes[:, 10:] > 1).any())


def test_avgpool_cannot_place_its_tokens_and_says_why():
    with pytest.raises(ValueError, match="avgpool.*means over grid cells"):
        placed("avgpool", _two_encoders(), 12)
