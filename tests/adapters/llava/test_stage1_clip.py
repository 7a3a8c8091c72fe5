"""Stage 1 inside LLaVA's CLIP tower."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.core.token_scores import cls_attention, received_attention, similarity_to_mean
from meteor_plugin.stages.encoder import HF_CLIP_BLOCK, boundaries, split_drop
from meteor_plugin.compat.transformers import clip_layers
from meteor_plugin.testing.llava import make_batch

STAGE1 = dict(encoder=True, fusion=False, llm=False)


def test_boundaries_split_the_depth_into_three_segments():
    assert boundaries(23) == (8, 15)  # LLaVA-1.5: CLIP-L, hidden_states[-2]
    assert boundaries(3) == (1, 2)
    assert boundaries(2) == (1, 1)
    assert split_drop(576, 144, 0.5) == (360, 144)
    with pytest.raises(ValueError, match="at least 2 encoder blocks"):
        boundaries(1)


def test_later_clip_blocks_run_on_fewer_tokens_and_the_llm_gets_the_budget(tiny_llava):
    model = tiny_llava()
    layers = clip_layers(model.get_vision_tower().vision_tower)
    seen = {}
    handles = [layer.mlp.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].shape[1]))
               for n, layer in enumerate(layers)]
    ids, mask, images = make_batch([(3, 5), (2, 7)], [True, True], seed=2)
    meteor_plugin.enable(**STAGE1, encoder_keep=16, encoder_shallow_share=0.5)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=images).logits
    for h in handles:
        h.remove()
    # 64 patches + CLS; select layer -2 of 4 blocks: boundaries before blocks 1 and 2.
    assert seen == {0: [65], 1: [41], 2: [17], 3: [17]}
    run = meteor_plugin.stats(model)
    for sample in run.stages:
        enc = sample["encoder"]
        assert (enc.entered, enc.left) == (64, 16)
        assert len(enc.detail["kept"]) == 16 and len(set(enc.detail["kept"])) == 16
        assert all(0 <= p < 64 for p in enc.detail["kept"])
    assert logits.shape[1] == int(mask.sum(1).max()) - 1 + 16


def test_cls_attention_from_block_qk_equals_eager_attention():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=4)
    config._attn_implementation = "eager"
    clip = CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = clip(pixels, output_attentions=True, output_hidden_states=True)
        layer = clip_layers(clip)[1]
        q, k, scale = HF_CLIP_BLOCK.qk(layer, out.hidden_states[1])
        ours = cls_attention(q, k, scale)
        received = received_attention(q, k, scale, chunk=7)
    expected = out.attentions[1][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(received, out.attentions[1].mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)


def test_shallow_boundary_drops_tokens_most_similar_to_the_mean(tiny_llava):
    model = tiny_llava()
    layers = clip_layers(model.get_vision_tower().vision_tower)
    inputs = {}

    def grab(module, args, kwargs):
        inputs.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    ids, mask, images = make_batch([(3, 5)], [True], seed=4)
    meteor_plugin.enable(**STAGE1, encoder_keep=16, encoder_shallow_share=1.0, spread_floor=0.0)  # every drop at the shallow boundary
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    kept = sorted(meteor_plugin.stats(model).stages[0]["encoder"].detail["kept"])
    sim = similarity_to_mean(inputs["h"][:, 1:])[0]
    expected = sorted(torch.argsort(sim, stable=True)[:16].tolist())
    assert kept == expected
    # With a spread floor, 4 of the 16 are evenly spaced over the grid, the other 12 by the same score.
    meteor_plugin.enable(**STAGE1, encoder_keep=16, encoder_shallow_share=1.0, spread_floor=0.25)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    floored = sorted(meteor_plugin.stats(model).stages[0]["encoder"].detail["kept"])
    spread = [8, 24, 40, 56]
    rest = [i for i in torch.argsort(sim, stable=True).tolist() if i not in spread][:12]
    assert floored == sorted(spread + rest) and floored != kept


@pytest.mark.parametrize("deep_score", ["attention", "similarity"])
def test_deep_boundary_scores_by_the_configured_score(tiny_llava, deep_score):
    model = tiny_llava()
    layers = clip_layers(model.get_vision_tower().vision_tower)
    inputs = {}

    def grab(module, args, kwargs):
        inputs.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    layers[2].register_forward_pre_hook(grab, with_kwargs=True)  # the deep boundary of 4 blocks at layer -2
    ids, mask, images = make_batch([(3, 5)], [True], seed=4)
    meteor_plugin.enable(**STAGE1, encoder_keep=16, encoder_shallow_share=0.0, encoder_deep_score=deep_score,
                         spread_floor=0.0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    kept = sorted(meteor_plugin.stats(model).stages[0]["encoder"].detail["kept"])
    h = inputs["h"]
    assert h.shape[1] == 65  # nothing dropped at the shallow boundary
    with torch.no_grad():
        q, k, scale = HF_CLIP_BLOCK.qk(layers[2], h)
        by_attention = sorted(torch.argsort(-cls_attention(q, k, scale)[0], stable=True)[:16].tolist())
    by_similarity = sorted(torch.argsort(similarity_to_mean(h[:, 1:])[0], stable=True)[:16].tolist())
    assert by_attention != by_similarity
    assert kept == (by_attention if deep_score == "attention" else by_similarity)


def test_stage1_and_stage3_generate_together(tiny_llava):
    model = tiny_llava(padding_side="left")
    model.generation_config.eos_token_id = None
    ids, mask, images = make_batch([(3, 5), (2, 8)], [True, True], pad_side="left", seed=6)
    meteor_plugin.enable(encoder=True, fusion=False, llm=True, encoder_keep=0.5, llm_min_keep=4, llm_max_keep=8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
    assert out.shape[1] >= 4
    for sample in meteor_plugin.stats(model).stages:
        assert (sample["encoder"].entered, sample["encoder"].left) == (64, 32)
        assert sample["llm"].entered == 32 and 4 <= sample["llm"].left <= 8
