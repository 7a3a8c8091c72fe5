"""transformers' LlavaOnevisionForConditionalGeneration (SigLIP tower, Qwen2 language model, anyres_max
pooling), against the unpatched model, on transformers 5.x. Stage 3 prunes it; Stage 1 prunes inside SigLIP
every image whose crop grid its anyres_max step keeps, and refuses by name an image whose grid it resamples;
video inputs are refused while pruning."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.compat.transformers import generation
from meteor_plugin.testing.llm import input_lengths
from meteor_plugin.testing.llava import HF_IMAGE_TOKEN, batch_and_alone, build_tiny_hf_onevision, hf_next_batch

pytestmark = pytest.mark.skipif(generation() != "5", reason="transformers' LLaVA-OneVision is pruned on 5.x only")
STAGE3 = dict(encoder=False, fusion=False, llm=True)
SIZES = [(32, 64), (64, 64), (64, 32)]  # 1x2, 2x2 (interpolated down) and 2x1 crop grids


def model_and_batch(text_lengths, seed=0, max_crops=1):
    model = build_tiny_hf_onevision(max_crops=max_crops)
    return model, hf_next_batch(model, text_lengths, SIZES[:len(text_lengths)], seed=seed)


def run(model, ids, mask, pixels, sizes, **extra):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, **extra).logits


def generate(model, ids, mask, pixels, sizes, steps=4):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=steps, do_sample=False, num_beams=1)
    return out[:, ids.shape[1]:]


def separators(model, pixels, sizes, **extra):
    """Row separators per image in the unpruned features (the plugin disabled)."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, sizes, return_dict=True, **extra).pooler_output
    return [int((f == model.model.image_newline.view(1, -1)).all(-1).sum()) for f in feats]


def layer_lengths(model, fn):
    return input_lengths([layer.self_attn.k_proj for layer in model.model.language_model.layers], fn)


def test_pruning_off_matches_unpatched_and_disable_restores():
    model, (ids, mask, pixels, sizes) = model_and_batch([(4, 6), (3, 9)], seed=1)
    reference, tokens = run(model, ids, mask, pixels, sizes), generate(model, ids, mask, pixels, sizes)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    torch.testing.assert_close(run(model, ids, mask, pixels, sizes), reference, atol=1e-5, rtol=0)
    assert torch.equal(generate(model, ids, mask, pixels, sizes), tokens)
    meteor_plugin.enable(**STAGE3, llm_min_keep=8, llm_max_keep=8)
    pruned = run(model, ids, mask, pixels, sizes)  # logits of the kept positions: the last is the prompt's last
    assert pruned.shape[1] < reference.shape[1] and not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-3)
    meteor_plugin.disable()
    assert meteor_plugin.stats(model) is None
    torch.testing.assert_close(run(model, ids, mask, pixels, sizes), reference, atol=0, rtol=0)


def test_stage1_refuses_an_image_whose_crop_grid_anyres_max_resamples_and_stage3_runs():
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 5)])  # anyres_max_1: a 1x2 grid is shrunk to 1 crop
    meteor_plugin.enable()  # the defaults: Stage 1 on
    with pytest.raises(NotImplementedError, match=r"LlavaOnevisionForConditionalGeneration: image 0 \(32x64\) makes "
                                                  "a 1x2 crop grid that its anyres_max_1 step interpolates down"):
        run(model, ids, mask, pixels, sizes)
    with pytest.raises(NotImplementedError, match="set encoder=False"):
        generate(model, ids, mask, pixels, sizes)
    meteor_plugin.enable(encoder=False)
    run(model, ids, mask, pixels, sizes)
    llm = meteor_plugin.stats(model).stages[0]["llm"]
    assert 0 < llm.left < llm.entered


def test_stage1_prunes_inside_siglip_on_every_crop_and_keeps_every_row_separator():
    # anyres_max_4: the 1x2, 2x2 and 2x1 grids fit, so none is resampled
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 7), (2, 4), (5, 3)], seed=2, max_crops=4)
    rows = separators(model, pixels, sizes)
    cfg = meteor_plugin.enable(fusion=False, llm_min_keep=8, llm_max_keep=8)
    seen = layer_lengths(model, lambda: run(model, ids, mask, pixels, sizes))
    keep = int(cfg.encoder_keep * 64)
    for i, sample in enumerate(meteor_plugin.stats(model).stages):
        inputs = 1 + (2 if i != 1 else 4)  # the base image and its crops
        assert (sample["encoder"].entered, sample["encoder"].left) == (64 * inputs, keep * inputs)
        anyres = sample["anyres"]
        assert anyres.detail["newlines"] == rows[i] and anyres.detail["base"] == keep
        assert anyres.left == keep * inputs and sample["llm"].entered == anyres.left and sample["llm"].left == 8
    text = [int(mask[i].sum()) - int((ids[i] == HF_IMAGE_TOKEN).sum()) for i in range(3)]
    inputs = [3, 5, 3]
    assert seen[0] == [max(t + r + keep * n for t, r, n in zip(text, rows, inputs))]  # the longest sets the width
    assert seen[3] == [max(t + r + 8 for t, r in zip(text, rows))]


def test_stage1_and_3_batch_generate_equals_each_sample_alone_and_greedy_without_cache():
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 4), (5, 9), (2, 6)], seed=4, max_crops=4)
    meteor_plugin.enable(fusion=False, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    for i, (in_batch, alone, kept, kept_alone) in enumerate(batch_and_alone(model, generate, ids, mask, pixels, sizes)):
        assert torch.equal(in_batch, alone) and kept == kept_alone, f"sample {i}"
    meteor_plugin.enable(fusion=False, llm=False)
    grown, grown_mask = ids[:1], mask[:1]
    for _ in range(4):
        nxt = run(model, grown, grown_mask, pixels[:1], sizes[:1])[:, -1].argmax(-1, keepdim=True)
        grown, grown_mask = torch.cat([grown, nxt], 1), torch.cat([grown_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(generate(model, ids[:1], mask[:1], pixels[:1], sizes[:1]), grown[:, ids.shape[1]:])


def test_layers_after_llm_layer_run_on_fewer_tokens_and_every_row_separator_stays():
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 7), (2, 4), (5, 3)], seed=2)
    rows = separators(model, pixels, sizes)
    meteor_plugin.enable(**STAGE3, llm_layer=2, llm_min_keep=16, llm_max_keep=16)
    seen = layer_lengths(model, lambda: run(model, ids, mask, pixels, sizes))
    width = ids.shape[1]
    assert seen[0] == [width] and seen[1] == [width, width]  # layer 1 scores too (llm_score_layers='up_to')
    for i, sample in enumerate(meteor_plugin.stats(model).stages):
        images = int((ids[i] == HF_IMAGE_TOKEN).sum())
        anyres = sample["anyres"]
        assert anyres.detail["newlines"] == rows[i] and anyres.left == images - rows[i]
        assert anyres.detail["base"] == 64 and anyres.entered == 64 * (1 + (2 if i != 1 else 4))
        assert (sample["llm"].entered, sample["llm"].left) == (images - rows[i], 16)
    # after llm_layer every sample has its text, its separators and 16 visual tokens: the longest sets the width
    text = [int(mask[i].sum()) - int((ids[i] == HF_IMAGE_TOKEN).sum()) for i in range(3)]
    assert seen[3] == [max(t + r + 16 for t, r in zip(text, rows))]


def test_batch_generate_equals_each_sample_alone():
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 4), (5, 9), (2, 6)], seed=4)
    meteor_plugin.enable(encoder=False, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    batch = generate(model, ids, mask, pixels, sizes)
    kept = [s["llm"].left for s in meteor_plugin.stats(model).stages]
    for i in range(3):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = generate(model, row, torch.ones_like(row), pixels[i:i + 1], sizes[i:i + 1])
        assert torch.equal(batch[i:i + 1], alone), f"sample {i}"
        assert meteor_plugin.stats(model).stages[0]["llm"].left == kept[i]


def test_prefill_of_generate_picks_what_the_pruned_forward_predicts():
    model, (ids, mask, pixels, sizes) = model_and_batch([(4, 8)], seed=3)
    meteor_plugin.enable(**STAGE3, llm_min_keep=8, llm_max_keep=8)
    first = run(model, ids, mask, pixels, sizes)[:, -1].argmax(-1)
    kept = meteor_plugin.stats(model).stages[0]["llm"].detail["kept"]
    assert torch.equal(generate(model, ids, mask, pixels, sizes, steps=1)[:, -1], first)
    assert meteor_plugin.stats(model).stages[0]["llm"].detail["kept"] == kept


def test_several_images_in_one_sample_are_not_cropped_and_each_keeps_its_separator():
    model = build_tiny_hf_onevision()
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 5, 3, 32, 32, generator=g)
    sizes, per_sample = torch.tensor([[64, 64], [32, 64]]), torch.tensor([2])
    counts = [65, 65]  # 8x8 patches and one separator each: images that share a sample are not cropped
    ids = torch.tensor([[1, 5, 6] + [HF_IMAGE_TOKEN] * counts[0] + [7] + [HF_IMAGE_TOKEN] * counts[1] + [8, 9]])
    mask = torch.ones_like(ids)
    reference = run(model, ids, mask, pixels, sizes, batch_num_images=per_sample)
    meteor_plugin.enable(**STAGE3, llm_min_keep=20, llm_max_keep=20)
    pruned = run(model, ids, mask, pixels, sizes, batch_num_images=per_sample)
    s = meteor_plugin.stats(model).stages[0]
    assert (s["anyres"].entered, s["anyres"].left, s["anyres"].detail["newlines"]) == (128, 128, 2)
    assert (s["llm"].entered, s["llm"].left) == (128, 20)
    # logits of the kept positions: 6 text tokens, 2 separators and 20 of the 128 visual tokens
    assert pruned.shape[1] == 6 + 2 + 20 and not torch.allclose(pruned[:, -1], reference[:, -1], atol=1e-3)
    # Stage 1 too: uncropped images are never resampled, so even anyres_max_1 prunes them
    cfg = meteor_plugin.enable(fusion=False, llm_min_keep=20, llm_max_keep=20)
    run(model, ids, mask, pixels, sizes, batch_num_images=per_sample)
    s = meteor_plugin.stats(model).stages[0]
    keep = int(cfg.encoder_keep * 64)
    assert (s["encoder"].entered, s["encoder"].left, s["anyres"].left) == (128, 2 * keep, 2 * keep)


def test_video_inputs_are_refused_while_pruning():
    model, (ids, mask, pixels, sizes) = model_and_batch([(3, 5)])
    videos = torch.randn(1, 2, 3, 32, 32)
    meteor_plugin.enable(**STAGE3)
    with pytest.raises(NotImplementedError, match="does not prune video inputs"):
        run(model, ids, mask, pixels, sizes, pixel_values_videos=videos)
    with pytest.raises(NotImplementedError, match="does not prune video inputs"):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=videos, max_new_tokens=1)
