"""Stages 1 and 2 (and 3 on top) on the EAGLE stand-in: both fusion modes, budgets, conversion."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.testing.llava import make_batch

NAMES = ["clip-448", "convnext-1024", "sam-1024", "pix2struct-1024"]
COUNTS = [576, 1024, 1024, 1024]  # native tokens per encoder in the stand-in
RANKS = {"clip-448": 10.0, "convnext-1024": 30.0, "sam-1024": 20.0, "pix2struct-1024": 40.0}


def batch(n=2, seed=0, pad="right"):
    lengths = [(3, 5), (2, 9), (4, 4)][:n]
    return make_batch(lengths, [True] * n, pad_side=pad, image_size=128, seed=seed)


def forward(model, ids, mask, images, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images, **kw).logits


def test_every_stage_off_equals_the_unpatched_model(eagle):
    model = eagle()
    ids, mask, images = batch()
    reference = forward(model, ids, mask, images)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    torch.testing.assert_close(forward(model, ids, mask, images), reference, atol=0, rtol=0)
    # Training-free fusion that keeps every grid position is the unpatched model too.
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, fusion_keep=1.0, fusion_mode="training_free")
    torch.testing.assert_close(forward(model, ids, mask, images), reference, atol=1e-5, rtol=1e-5)


def test_post_projection_counts_per_encoder_and_stage_match_budgets_and_hooks(eagle):
    model = eagle(converted=True)
    ids, mask, images = batch()
    images[1] = images[1].flip(-1) * 0.5  # two different images
    seen = {}
    handles = [p.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].shape[1]))
               for n, p in zip(NAMES, model.get_model().mm_projectors)]
    first_layer = []
    handles.append(model.get_model().layers[0].register_forward_pre_hook(
        lambda m, a, kw: first_layer.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True))
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, encoder_keep=1200, fusion_keep=576,
                         encoder_ranks=RANKS)
    forward(model, ids, mask, images)
    for h in handles:
        h.remove()
    budgets = [120, 360, 240, 480]  # 1200 split 10:30:20:40
    assert [seen[n] for n in NAMES] == [[b] for b in budgets]
    run = meteor_plugin.stats(model)
    for sample in run.stages:
        enc, fus = sample["encoder"], sample["fusion"]
        assert (enc.entered, enc.left) == (sum(COUNTS), 1200)
        assert enc.detail["per_encoder"] == {n: [c, b] for n, c, b in zip(NAMES, COUNTS, budgets)}
        assert (fus.entered, fus.left) == (1200, 576)
        assert sum(fus.detail["per_encoder"].values()) == 576
    assert first_layer == [int(mask.sum(1).max()) - 1 + 576]
    kept = [s["fusion"].detail["kept"] for s in run.stages]
    assert kept[0] != kept[1]  # different images keep different tokens
    # fusion_quota="rank": Stage 2's 576 are shared 10:30:20:40 as Stage 1's budget was, on every image.
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, encoder_keep=1200, fusion_keep=576,
                         encoder_ranks=RANKS, fusion_quota="rank")
    forward(model, ids, mask, images)
    shares = [s["fusion"].detail["per_encoder"] for s in meteor_plugin.stats(model).stages]
    assert shares == [dict(zip(NAMES, [58, 173, 115, 230]))] * 2


def test_clip_blocks_run_on_fewer_tokens_inside_eagle(eagle):
    from meteor_plugin.compat.transformers import clip_layers

    model = eagle(converted=True)
    clip = model.get_model().get_vision_tower().vision_towers[0]
    layers = clip_layers(clip.vision_tower)
    seen = {}
    for n, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].shape[1]))
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=1200, encoder_ranks=RANKS)
    forward(model, *batch())
    # 3 blocks, no CLS (EAGLE drops it): 576 -> 348 before block 1 -> 120 before block 2
    assert seen == {0: [576], 1: [348], 2: [120]}


def test_rank_zero_and_missing_ranks(eagle):
    model = eagle(converted=True)
    ids, mask, images = batch()
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=900,
                         encoder_ranks={**RANKS, "sam-1024": 0.0})
    forward(model, ids, mask, images)
    per = meteor_plugin.stats(model).stages[0]["encoder"].detail["per_encoder"]
    assert per["sam-1024"] == [1024, 0] and sum(v[1] for v in per.values()) == 900
    model2 = eagle(converted=True)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=900,
                         encoder_ranks={"clip-448": 1.0})
    with pytest.warns(UserWarning, match="no encoder_ranks for convnext-1024, sam-1024, pix2struct-1024"):
        forward(model2, ids, mask, images)
    per = meteor_plugin.stats(model2).stages[0]["encoder"].detail["per_encoder"]
    assert [v[1] for v in per.values()] == [225, 225, 225, 225]


def test_selection_is_deterministic_and_gradients_reach_the_per_encoder_projectors(eagle):
    model = eagle(converted=True)
    model.train()
    ids, mask, images = batch()
    labels = ids.clone().masked_fill(ids < 0, -100)
    meteor_plugin.enable(encoder=True, fusion=True, llm=True, encoder_keep=0.3, fusion_keep=0.5,
                         encoder_ranks=RANKS, llm_min_keep=20, llm_max_keep=60)
    out = model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
    first = [(s["fusion"].detail["kept"], s["llm"].detail["kept"]) for s in meteor_plugin.stats(model).stages]
    out.loss.backward()
    for projector in model.get_model().mm_projectors:
        assert projector[0].weight.grad is not None and projector[0].weight.grad.abs().sum() > 0
    again = model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
    assert [(s["fusion"].detail["kept"], s["llm"].detail["kept"]) for s in meteor_plugin.stats(model).stages] == first
    torch.testing.assert_close(again.loss, out.loss)


@pytest.mark.parametrize("converted", [False, True], ids=["training_free", "post_projection"])
def test_generate_end_to_end_with_all_three_stages(eagle, converted):
    from tests.stages.test_decoder_llava import greedy_without_cache

    model = eagle(converted=converted, padding_side="left")
    ids, mask, images = batch(pad="left", seed=3)
    meteor_plugin.enable(encoder=True, fusion=True, llm=True, encoder_keep=0.3, fusion_keep=256,
                         encoder_ranks=RANKS, llm_min_keep=16, llm_max_keep=64, llm_lambda=60.0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
    tokens = out[:, -4:]
    run = meteor_plugin.stats(model)
    for sample in run.stages:
        assert sample["fusion"].left == 256
        assert sample["llm"].entered == 256 and 16 <= sample["llm"].left <= 64
    assert torch.equal(tokens, greedy_without_cache(model, ids, mask, images, 4))


def test_converted_checkpoint_saves_and_reloads_its_projectors(eagle, tmp_path):
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

    model = eagle(converted=True)
    with torch.no_grad():
        for p in model.get_model().mm_projectors.parameters():
            p.add_(0.01)  # as if trained
    ids, mask, images = batch()
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, encoder_keep=0.3, fusion_keep=0.5, encoder_ranks=RANKS)
    reference = forward(model, ids, mask, images)
    model.save_pretrained(tmp_path / "eagle-meteor")
    reloaded = EagleLlamaForCausalLM.from_pretrained(tmp_path / "eagle-meteor").eval()
    for a, b in zip(model.get_model().mm_projectors.parameters(), reloaded.get_model().mm_projectors.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(forward(reloaded, ids, mask, images), reference, atol=1e-5, rtol=1e-5)
    meteor_plugin.disable()
    bare = EagleLlamaForCausalLM.from_pretrained(tmp_path / "eagle-meteor")
    assert getattr(bare.get_model(), "mm_projectors", None) is None
    meteor_plugin.enable(llm=False)
    with pytest.raises(ValueError, match="enable meteor-plugin before loading the model"):
        forward(bare, ids, mask, images)


def test_split_projectors_reproduce_the_shared_first_layer(eagle):
    from meteor_plugin.adapters.eagle import convert_to_post_projection

    model = eagle()
    shared = model.get_model().mm_projector
    convert_to_post_projection(model)
    channels = [t.hidden_size for t in model.get_model().get_vision_tower().vision_towers]
    x = [torch.randn(2, 5, c) for c in channels]
    summed = sum(p[0](xi) for p, xi in zip(model.get_model().mm_projectors, x)) - (len(x) - 1) * shared[0].bias
    torch.testing.assert_close(summed, shared[0](torch.cat(x, dim=-1)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has per-encoder projectors"):
        convert_to_post_projection(model)


def test_fusion_mode_errors_name_the_fix(eagle):
    model = eagle()
    meteor_plugin.enable(fusion_mode="post_projection", llm=False)
    with pytest.raises(ValueError, match="fusion_mode='post_projection' needs per-encoder projectors"):
        forward(model, *batch())


def test_post_projection_runs_with_float16_towers_and_float32_projectors(eagle):
    """What upstream train() makes without --bf16: the towers cast to float16, everything else float32
    (EAGLE's channel concatenation promotes the dtypes; one encoder's output alone is not promoted)."""
    model = eagle(converted=True, vision_tower="clip-448;convnext-1024;pix2struct-1024")
    model.get_vision_tower().to(torch.float16)
    ids, mask, images = batch()
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, encoder_keep=192, fusion_keep=48, encoder_ranks=RANKS)
    logits = forward(model, ids, mask, images)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert [s["fusion"].left for s in meteor_plugin.stats(model).stages] == [48, 48]


def _fusion_run(eagle, **config):
    """One forward of a converted EAGLE stand-in with Stage 2 alone: (projected tokens z, owner, stats)."""
    model = eagle(converted=True)
    ids, mask, images = batch()
    images[1] = images[1].flip(-1) * 0.5
    projected = []
    handles = [p.register_forward_hook(lambda m, i, o: projected.append(o.detach()))
               for p in model.get_model().mm_projectors]
    meteor_plugin.enable(encoder=False, fusion=True, llm=False, fusion_keep=300, **config)
    forward(model, ids, mask, images)
    for h in handles:
        h.remove()
    owner = torch.cat([torch.full((n,), j) for j, n in enumerate(COUNTS)])
    return torch.cat(projected, dim=1), owner, meteor_plugin.stats(model).stages


@pytest.mark.parametrize("similarity", ["cosine", "centred_cosine"])
def test_fusion_keeps_the_least_redundant_tokens_by_the_configured_similarity(eagle, similarity):
    from meteor_plugin.core.token_scores import cooperative_redundancy

    z, owner, stages = _fusion_run(eagle, fusion_similarity=similarity, spread_floor=0.0)
    redundancy = cooperative_redundancy(z, owner, centred=similarity == "centred_cosine")
    expected = [sorted(r.topk(300, largest=False).indices.tolist()) for r in redundancy]
    assert [sorted(s["fusion"].detail["kept"]) for s in stages] == expected
    other = cooperative_redundancy(z, owner, centred=similarity != "centred_cosine")
    assert expected != [sorted(r.topk(300, largest=False).indices.tolist()) for r in other]


@pytest.mark.parametrize("spread_floor", [0.0, 0.25])
def test_duplicate_aware_fusion_keeps_the_reference_selection(eagle, spread_floor):
    from meteor_plugin.core.select import owner_spread
    from meteor_plugin.core.token_scores import duplicate_aware_mask

    z, owner, stages = _fusion_run(eagle, spread_floor=spread_floor)  # the default similarity
    reserved = owner_spread(owner, 75) if spread_floor else None  # a quarter of 300, spread per encoder
    expected = [torch.nonzero(m).flatten().tolist() for m in duplicate_aware_mask(z, owner, 300, reserved)]
    assert [sorted(s["fusion"].detail["kept"]) for s in stages] == expected
    assert expected[0] != expected[1]
    if spread_floor:
        assert set(torch.nonzero(reserved).flatten().tolist()) <= set(expected[0]) & set(expected[1])


def test_a_non_default_similarity_on_an_unconverted_model_is_refused(eagle):
    model = eagle()
    for similarity in ("centred_cosine", "cosine"):
        meteor_plugin.enable(llm=False, fusion_similarity=similarity)
        with pytest.raises(ValueError, match=f"fusion_similarity='{similarity}' applies to post-projection fusion"):
            forward(model, *batch())
    meteor_plugin.enable(llm=False, fusion_quota="rank")
    with pytest.raises(ValueError, match="fusion_quota='rank' applies to post-projection fusion"):
        forward(model, *batch())
    # The default, and a version 1 config's default (the paper's cosine), run training-free.
    for config in (meteor_plugin.MeteorConfig(llm=False, fusion_keep=100),
                   meteor_plugin.MeteorConfig.from_dict({"llm": False, "fusion_keep": 100})):
        meteor_plugin.enable(config)
        forward(model, *batch())
        assert [s["fusion"].left for s in meteor_plugin.stats(model).stages] == [100, 100]
