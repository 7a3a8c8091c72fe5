"""transformers' own LlavaForConditionalGeneration and LlavaNextForConditionalGeneration (llava-hf
checkpoints), against the unpatched models, on every stack: transformers 5.x (the processor writes one image
token per visual token, the model scatters features into them) and 4.37/4.44 (one image token per image,
spliced inside the model; the adapter splices the pruned image itself, adapters/hf_llava/v4.py).
"""

import pytest
import torch
import transformers

import meteor_plugin
from meteor_plugin.compat.transformers import generation
from meteor_plugin.testing.llava import (HF_IMAGE_TOKEN, batch_and_alone, TinyLlavaSpec, build_tiny_hf_llava, hf_batch,
                                         hf_image_features, hf_image_newline, hf_language_layers)
from meteor_plugin.testing.llm import input_lengths

VISUAL = 64
STAGE3 = dict(encoder=False, fusion=False, llm=True)
V5 = generation() == "5"
PER_IMAGE = VISUAL if V5 else 1  # image tokens in a prompt per (LLaVA-1.5) image
GROWN = VISUAL - PER_IMAGE  # how much longer the language model's sequence is than the prompt, per image


def model_of(tower="clip", **fields):
    return build_tiny_hf_llava(TinyLlavaSpec(**fields), tower=tower)


def prompts(lengths, seed=0, **kwargs):
    return hf_batch(lengths, visual_tokens=PER_IMAGE, seed=seed, **kwargs)


towers = pytest.mark.parametrize("tower", ["clip", "siglip"])


def logits(model, ids, mask, pixels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


def real_logits(model, ids, mask, pixels):
    """Logits at the real (not padding) positions of the left-padded sequence the language model ran on."""
    out = logits(model, ids, mask, pixels)
    lengths = mask.sum(dim=1) + GROWN
    return torch.cat([row[-int(n):] for row, n in zip(out, lengths)])


def generate(model, ids, mask, pixels, steps=4):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                              do_sample=False, num_beams=1)


def greedy(model, ids, mask, pixels, steps=4):
    """Greedy decoding without a cache: a full forward per new token. The prompt and the new tokens."""
    for _ in range(steps):
        nxt = logits(model, ids, mask, pixels)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def layer_lengths(model, fn):
    return input_lengths([layer.self_attn.k_proj for layer in hf_language_layers(model)], fn)


@towers
@pytest.mark.parametrize("how", ["stages_off", "keep_everything"])
def test_pruning_off_matches_unpatched(how, tower):
    model = model_of(tower)
    ids, mask, pixels = prompts([(4, 6), (3, 9)], seed=1)
    reference = real_logits(model, ids, mask, pixels)
    # 4.x's own generate guesses later steps' mask from zero keys and gets a left-padded batch wrong once the
    # adapter splices (keep_everything); the reference there is the unpatched model decoded without a cache.
    ref_tokens = generate(model, ids, mask, pixels) if V5 or how == "stages_off" else greedy(model, ids, mask, pixels)
    if how == "stages_off":
        meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    else:
        meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    torch.testing.assert_close(real_logits(model, ids, mask, pixels), reference, atol=1e-5, rtol=0)
    assert torch.equal(generate(model, ids, mask, pixels), ref_tokens)


@pytest.mark.parametrize("language", ["llama", "mistral"])
def test_layers_after_llm_layer_run_on_fewer_tokens(language):
    model = model_of(language=language)
    ids, mask, pixels = prompts([(3, 7)])
    full = ids.shape[1] + GROWN
    meteor_plugin.enable(**STAGE3, llm_layer=2, llm_min_keep=16, llm_max_keep=16)
    seen = layer_lengths(model, lambda: logits(model, ids, mask, pixels))
    # layer 1 also scores the visual tokens (llm_score_layers='up_to': the attention up to Stage 3's layer)
    assert seen[0] == [full] and seen[1] == [full, full]
    assert seen[2] == [full, full - VISUAL + 16] and seen[3] == [full - VISUAL + 16]
    llm = meteor_plugin.stats(model).stages[0]["llm"]
    assert (llm.entered, llm.left) == (VISUAL, 16)


@towers
def test_stage1_prunes_inside_the_tower_and_generate_gives_back_the_users_prompt(tower):
    model = model_of(tower)
    ids, mask, pixels = prompts([(3, 7)])
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=0.25)
    seen = layer_lengths(model, lambda: logits(model, ids, mask, pixels))
    assert seen[0] == [ids.shape[1] - PER_IMAGE + 16]  # the language model never sees the pruned patches
    encoder = meteor_plugin.stats(model).stages[0]["encoder"]
    assert (encoder.entered, encoder.left, len(encoder.detail["kept"][0])) == (VISUAL, 16, 16)
    out = generate(model, ids, mask, pixels, steps=3)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, :ids.shape[1]], ids)
    # generate's own named arguments reach it: a generation_config of 2 new tokens gives 2
    config = transformers.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, generation_config=config)
    assert out.shape == (1, ids.shape[1] + 2) and torch.equal(out[:, :ids.shape[1]], ids)


@towers
def test_stage1_cached_generate_equals_greedy_without_cache(tower):
    model = model_of(tower)
    ids, mask, pixels = prompts([(4, 8)], seed=3)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=0.25)
    assert torch.equal(generate(model, ids, mask, pixels), greedy(model, ids, mask, pixels))


def test_stage3_prefill_picks_what_the_pruned_forward_predicts():
    model = model_of()
    ids, mask, pixels = prompts([(4, 8)], seed=2)
    meteor_plugin.enable(**STAGE3, llm_min_keep=8, llm_max_keep=8)
    first = logits(model, ids, mask, pixels)[:, -1].argmax(-1)
    kept = meteor_plugin.stats(model).stages[0]["llm"].detail["kept"]
    assert torch.equal(generate(model, ids, mask, pixels, steps=1)[:, -1], first)
    assert meteor_plugin.stats(model).stages[0]["llm"].detail["kept"] == kept


@towers
def test_batch_generate_equals_each_sample_alone(tower):
    model = model_of(tower)
    ids, mask, pixels = prompts([(3, 4), (5, 11), (2, 7)], seed=5)
    meteor_plugin.enable(fusion=False, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    batch = generate(model, ids, mask, pixels)[:, ids.shape[1]:]
    kept = [(s["encoder"].left, s["llm"].left) for s in meteor_plugin.stats(model).stages]
    for i in range(3):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = generate(model, row, torch.ones_like(row), pixels[i:i + 1])[:, row.shape[1]:]
        assert torch.equal(batch[i:i + 1], alone), f"sample {i}"
        s = meteor_plugin.stats(model).stages[0]
        assert (s["encoder"].left, s["llm"].left) == kept[i]


def test_text_only_model_of_the_same_class_runs_unchanged_and_disable_restores():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    model = model_of()
    torch.manual_seed(0)
    text = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2)).eval()
    prompt = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        reference = text(input_ids=prompt).logits
    owner = type(model.model) if V5 else type(model)  # whose forward fits the prompt: the inner model on 5.x
    forward, lm_forward = owner.__dict__["forward"], LlamaModel.__dict__["forward"]
    meteor_plugin.enable(**STAGE3, llm_min_keep=8, llm_max_keep=8)
    ids, mask, pixels = prompts([(2, 5)])
    logits(model, ids, mask, pixels)  # patches the language model's class (LlamaModel) at the first forward
    with torch.no_grad():
        assert torch.equal(text(input_ids=prompt).logits, reference)
    assert LlamaModel.__dict__["forward"] is not lm_forward
    meteor_plugin.disable()
    assert owner.__dict__["forward"] is forward and LlamaModel.__dict__["forward"] is lm_forward


def test_a_loss_or_training_forward_with_pruning_is_refused():
    model = model_of()
    ids, mask, pixels = prompts([(2, 5)])
    meteor_plugin.enable()
    with pytest.raises(NotImplementedError, match="labels would not follow the pruned sequence"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    assert HF_IMAGE_TOKEN == (model.config.image_token_id if V5 else model.config.image_token_index)


# LLaVA-NeXT: anyres crops, unpad, row separators -------------------------------------------------------------
NEXT_SIZES = [(48, 64), (64, 30), (64, 64)]  # (height, width): 2x2 crops unpadded, 2x1 crops, 2x2 crops


def next_model_and_batch(lengths, seed=0, tower="clip"):
    from meteor_plugin.testing.llava import hf_next_batch

    if not hasattr(transformers, "LlavaNextForConditionalGeneration"):
        pytest.skip("transformers has LLaVA-NeXT from 4.39")
    model = model_of(tower, merge="spatial_unpad")
    return model, hf_next_batch(model, lengths, NEXT_SIZES[:len(lengths)], seed=seed)


def next_logits(model, ids, mask, pixels, sizes):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits


def next_generate(model, ids, mask, pixels, sizes, steps=4):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes,
                             max_new_tokens=steps, do_sample=False, num_beams=1)
    return out[:, ids.shape[1]:]


def separators(model, pixels, sizes):
    """Row separators per image in the unpruned features (the plugin disabled)."""
    line = hf_image_newline(model).view(1, -1)
    return [int((f == line).all(-1).sum()) for f in hf_image_features(model, pixels, sizes)]


@pytest.mark.parametrize("how", ["stages_off", "keep_everything"])
def test_next_pruning_off_matches_unpatched(how):
    model, (ids, mask, pixels, sizes) = next_model_and_batch([(4, 6), (3, 9)], seed=1)
    # 4.x splices each image's features (row separators included) in place of its one image token.
    lengths = mask.sum(dim=1) if V5 else mask.sum(dim=1) - 1 + torch.tensor(
        [f.shape[0] for f in hf_image_features(model, pixels, sizes)])

    def real_next_logits():
        return torch.cat([row[-int(n):] for row, n in zip(next_logits(model, ids, mask, pixels, sizes), lengths)])

    reference = real_next_logits()
    tokens = next_generate(model, ids[:1], mask[:1], pixels[:1], sizes[:1])  # 4.44's batched generate: see above
    if how == "stages_off":
        meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    else:
        meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    torch.testing.assert_close(real_next_logits(), reference, atol=1e-5, rtol=0)
    assert torch.equal(next_generate(model, ids[:1], mask[:1], pixels[:1], sizes[:1]), tokens)


@towers
def test_next_default_config_keeps_every_row_separator_and_counts_base_and_crops(tower):
    model, (ids, mask, pixels, sizes) = next_model_and_batch([(3, 7)], tower=tower)
    rows = separators(model, pixels, sizes)[0]
    text = int(mask.sum()) - int((ids == HF_IMAGE_TOKEN).sum())  # the prompt's tokens less its image tokens
    cfg = meteor_plugin.enable(fusion=False)
    seen = layer_lengths(model, lambda: next_logits(model, ids, mask, pixels, sizes))
    s = meteor_plugin.stats(model).stages[0]
    keep = int(cfg.encoder_keep * VISUAL)
    assert (s["encoder"].entered, s["encoder"].left) == (5 * VISUAL, 5 * keep)
    assert s["anyres"].detail["newlines"] == rows and s["anyres"].detail["base"] == keep
    assert s["anyres"].detail["crops"] == s["anyres"].left - keep and s["llm"].entered == s["anyres"].left
    last = len(hf_language_layers(model)) - 1
    assert seen[0] == [text + s["anyres"].left + rows]
    assert seen[last] == [text + s["llm"].left + rows] and s["llm"].left < s["llm"].entered


def test_next_batch_generate_equals_each_sample_alone():
    model, (ids, mask, pixels, sizes) = next_model_and_batch([(3, 4), (5, 9), (2, 6)], seed=4)
    meteor_plugin.enable(fusion=False, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    for i, (in_batch, alone, kept, kept_alone) in enumerate(batch_and_alone(model, next_generate, ids, mask, pixels, sizes)):
        assert torch.equal(in_batch, alone) and kept == kept_alone, f"sample {i}"


@towers
def test_next_stage1_cached_generate_equals_greedy_without_cache(tower):
    model, (ids, mask, pixels, sizes) = next_model_and_batch([(4, 8)], seed=3, tower=tower)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=0.25)
    steps = 4
    cached = next_generate(model, ids, mask, pixels, sizes, steps)
    grown, grown_mask = ids, mask
    for _ in range(steps):
        nxt = next_logits(model, grown, grown_mask, pixels, sizes)[:, -1].argmax(-1, keepdim=True)
        grown, grown_mask = torch.cat([grown, nxt], 1), torch.cat([grown_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, grown[:, ids.shape[1]:])


def test_stage1_on_a_tower_it_does_not_know_is_refused_by_name_and_stage3_still_runs():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=dict(model_type="dinov2", hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4),
                         text_config=dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                         image_token_index=HF_IMAGE_TOKEN, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    ids, mask, pixels = prompts([(2, 5)])  # 5.x: 64 image tokens, DINOv2's 8x8 patches after its CLS
    meteor_plugin.enable()
    with pytest.raises(NotImplementedError, match="knows CLIP and SigLIP towers, not 'dinov2'"):
        logits(model, ids, mask, pixels)
    meteor_plugin.enable(encoder=False, fusion=False, llm=True, llm_min_keep=8, llm_max_keep=8)
    logits(model, ids, mask, pixels)
    assert meteor_plugin.stats(model).stages[0]["llm"].left == 8


def test_stage1_on_siglip_with_the_default_select_strategy_is_refused():
    model = model_of("siglip")
    model.config.vision_feature_select_strategy = "default"  # upstream would drop a patch: SigLIP has no CLS
    ids, mask, pixels = hf_batch([(2, 5)], visual_tokens=VISUAL - 1 if V5 else 1)
    meteor_plugin.enable()
    with pytest.raises(NotImplementedError, match="siglip_vision_model tower needs vision_feature_select_strategy"):
        logits(model, ids, mask, pixels)


@pytest.mark.skipif(V5, reason="transformers 5.x's prompts hold one image token per visual token")
def test_on_transformers_4_a_prompt_with_an_image_token_per_patch_is_refused_by_count():
    model = model_of()
    ids, mask, pixels = hf_batch([(2, 5)], visual_tokens=VISUAL)  # a 5.x processor's prompt
    meteor_plugin.enable(**STAGE3, llm_min_keep=8, llm_max_keep=8)
    with pytest.raises(ValueError, match="64 image tokens for 1 images; on transformers 4.x each image is one"):
        logits(model, ids, mask, pixels)


@towers
def test_proportional_attention_on_transformers_llava_keeps_positions_and_sizes(tower):
    model = model_of(tower)
    ids, mask, pixels = prompts([(2, 5), (4, 8)])  # left padded, as batched generate wants
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    reference = real_logits(model, ids, mask, pixels)
    for nothing_pruned in (dict(encoder=True, llm=False, encoder_keep=1.0),
                           dict(encoder=False, llm=True, llm_min_keep=1.0, llm_max_keep=1.0)):
        meteor_plugin.enable(fusion=False, **nothing_pruned, proportional_attention="on")
        torch.testing.assert_close(real_logits(model, ids, mask, pixels), reference, atol=1e-4, rtol=1e-4)
    # Stage 1: each kept patch at its unpruned place, the text after the image from the unpruned count on.
    layers = model.model.language_model.layers if V5 else model.language_model.model.layers
    seen = []
    handle = layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].clone()),
                                                 with_kwargs=True)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16, proportional_attention="on")
    logits(model, ids, mask, pixels)
    handle.remove()
    for row, sample in enumerate(meteor_plugin.stats(model).stages):
        real = ids[row][mask[row].bool()].tolist()
        before = real.index(HF_IMAGE_TOKEN)
        after = len(real) - before - PER_IMAGE
        (kept,) = sample["encoder"].detail["kept"]
        expected = [*range(before), *(before + p for p in kept), *range(before + VISUAL, before + VISUAL + after)]
        assert seen[-1][row, -len(expected):].tolist() == expected  # left padded: the real tokens come last
    # ... and generate continues from there: the same tokens as a full forward per new token.
    assert torch.equal(generate(model, ids, mask, pixels, 3)[:, -3:], greedy(model, ids, mask, pixels, 3)[:, -3:])
    # Stage 3: the kept visual keys carry the dropped ones' sizes: exp(bias) over a query's keys adds up to the
    # unpruned sequence's length. transformers 5: in the key column the attention gets (and no mask); 4.x: in the
    # float mask it gets, after the plugin's substitution.
    from meteor_plugin.compat import key_column

    def bias_row(m, a, k):
        column = key_column.current()
        masks.append((column.bias if column is not None else k["attention_mask"][:, 0, -1], k["attention_mask"]))

    masks = []
    handle = layers[3].self_attn.register_forward_pre_hook(bias_row, with_kwargs=True)
    meteor_plugin.enable(encoder=True, fusion=False, llm=True, encoder_keep=16, llm_layer=2, llm_min_keep=4,
                         llm_max_keep=4, proportional_attention="on")
    logits(model, ids, mask, pixels)
    handle.remove()
    last, layer_mask = masks[-1]
    last = last.float()  # (B, kept length): the last token's row
    assert (layer_mask is None) == V5  # SDPA's causal kernel, the padding in the column
    assert last.exp().sum(dim=1).tolist() == pytest.approx((mask.sum(dim=1) + GROWN).tolist(), rel=1e-4)
    assert last.max() > 0.5  # sizes above 1, not only zeros and -inf


def test_proportional_attention_on_llava_next_with_stage_1_is_refused_under_on_and_off_under_auto():
    model, (ids, mask, pixels, sizes) = next_model_and_batch([(2, 5)])
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16, proportional_attention="on")
    with pytest.raises(NotImplementedError, match="proportional_attention='on' does not run on LlavaNext.*packed crops"):
        next_logits(model, ids, mask, pixels, sizes)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16, proportional_attention="off")
    reference = next_logits(model, ids, mask, pixels, sizes)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16)
    with pytest.warns(UserWarning, match="proportional attention is off for this model: it does not run on LlavaNext"):
        torch.testing.assert_close(next_logits(model, ids, mask, pixels, sizes), reference, atol=0, rtol=0)
    # Stage 3 alone runs with it: every token at its own place with size 1, so nothing pruned is the unpruned model.
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    reference = next_logits(model, ids, mask, pixels, sizes)
    meteor_plugin.enable(encoder=False, fusion=False, llm=True, llm_min_keep=1.0, llm_max_keep=1.0,
                         proportional_attention="on")
    torch.testing.assert_close(next_logits(model, ids, mask, pixels, sizes), reference, atol=1e-4, rtol=1e-4)
