"""transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and
Qwen3VLForConditionalGeneration against the unpatched models (tiny random ones built in code): pruning off
changes nothing, Stage 3 scores from the layer's own attention and shortens the later layers, Stage 1 shortens the
prompt the language model sees, every kept token keeps its unpruned (t, h, w) position, cached generate equals
greedy decoding without a cache, a left-padded batch of images of different sizes equals each sample alone, and
disable() gives everything back."""

import pytest
import torch
import transformers

import meteor_plugin
from meteor_plugin.compat.transformers import LayerCall, generation
from meteor_plugin.testing.llm import input_lengths
from meteor_plugin.testing.qwen_vl import (CLASSES, IMAGE_TOKEN, KINDS, VIDEO_TOKEN, TinyQwenSpec, build_tiny_qwen_vl,
                                           merged_tokens, qwen_batch, sample_of)

STAGE3 = dict(encoder=False, fusion=False, llm=True)
STAGE1 = dict(encoder=True, fusion=False, llm=False)


def _skip_reason(kind):
    if generation() != "5":
        return "the Qwen-VL classes are pruned on transformers 5.x only"
    name = CLASSES[kind] + "ForConditionalGeneration"
    if not hasattr(transformers, name):
        return f"transformers {transformers.__version__} has no {name}"
    return None


kinds = pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.skipif(
    _skip_reason(k) is not None, reason=str(_skip_reason(k)))) for k in KINDS])

# Sample 0: one 8x8-patch image (16 tokens); sample 1: a 4x8 and an 8x4 image (8 tokens each), several per prompt.
IMAGES = [[(3, (1, 8, 8))], [(2, (1, 4, 8)), (1, (1, 8, 4))]]
TAIL = [5, 7]


def model_and_batch(kind, seed=1, **spec):
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind, **spec))
    return model, qwen_batch(model, IMAGES, TAIL, seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def generate(model, batch, steps=4, **extra):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, **{"num_beams": 1, **extra})
    return out[:, batch["input_ids"].shape[1]:]


def text_layers(model):
    return model.model.language_model.layers


def layer_lengths(model, fn):
    return input_lengths([layer.self_attn.k_proj for layer in text_layers(model)], fn)


def greedy_without_cache(model, batch, steps, monkeypatch):
    """Greedy decoding by full forwards without a KV cache, the generated tokens never Stage 3's query (they are
    the answer, as labels would mark them): every forward keeps what the prefill of a cached generate keeps."""
    from meteor_plugin.adapters.qwen_vl import inference
    from meteor_plugin.stages.layout import query_mask

    generated = [0]

    def prompt_query(visual, valid, labels, text_query):
        answer = torch.full(visual.shape, -100, dtype=torch.long, device=visual.device)
        if generated[0]:
            answer[:, -generated[0]:] = 1
        return query_mask(visual, valid, answer, text_query)

    monkeypatch.setattr(inference, "query_mask", prompt_query)
    batch = dict(batch)
    start = batch["input_ids"].shape[1]
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(**batch, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        batch["input_ids"] = torch.cat([batch["input_ids"], nxt], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(nxt).int()], 1)
        generated[0] += 1
    monkeypatch.undo()
    return batch["input_ids"][:, start:]


def language_model_inputs(model, fn):
    """The inputs_embeds length, position_ids and visual-token mask of every language-model call in ``fn``."""
    seen = []
    lm = model.model.language_model

    def grab(module, args, kwargs):
        seen.append({"length": kwargs["inputs_embeds"].shape[1], "position_ids": kwargs.get("position_ids")})

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return seen


# Pruning off --------------------------------------------------------------------------------------------------------
@kinds
@pytest.mark.parametrize("how", ["stages_off", "keep_everything"])
def test_pruning_off_matches_unpatched(kind, how):
    model, batch = model_and_batch(kind)
    reference, tokens = logits(model, batch), generate(model, batch)
    if how == "stages_off":
        meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    else:
        meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    assert torch.equal(logits(model, batch), reference)
    assert torch.equal(generate(model, batch), tokens)


@kinds
def test_disable_restores_exactly(kind):
    model, batch = model_and_batch(kind)
    reference = logits(model, batch)
    causal, inner, lm = type(model), type(model.model), type(model.model.language_model)
    block, merger = type(model.model.visual.blocks[0]), type(model.model.visual.merger)
    before = {(cls, name): cls.__dict__.get(name) for cls in (causal, inner, lm, block, merger)
              for name in ("generate", "forward", "_deepstack_process")}
    meteor_plugin.enable()
    pruned = logits(model, batch)
    assert pruned.shape[1] < reference.shape[1]  # the prompt lost image tokens
    assert lm.__dict__["forward"] is not before[(lm, "forward")]
    assert block.__dict__["forward"] is not before[(block, "forward")]  # Stage 1 ran inside the tower
    meteor_plugin.disable()
    assert {(cls, name): cls.__dict__.get(name) for cls, name in before} == before
    assert meteor_plugin.stats(model) is None
    assert torch.equal(logits(model, batch), reference)


# Stage 3 --------------------------------------------------------------------------------------------------------------
@kinds
def test_stage3_scores_are_the_layers_own_attention_under_multimodal_rope(kind):
    """The last query token's attention recomputed from the layer's q/k (Qwen3's q/k norms included) with the rotary
    table the layers get from the (t, h, w) positions equals the attention the eager layer computes."""
    from meteor_plugin.stages.decoder import llm_dims, query_attention

    model, batch = model_and_batch(kind, attn_implementation="eager")
    lm = model.model.language_model
    layer = lm.layers[2]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions[2]
    handle.remove()
    call = LayerCall(layer, seen["args"], seen["kwargs"])
    valid = batch["attention_mask"].bool()
    last = torch.zeros_like(valid)
    last[:, -1] = True
    with torch.no_grad():
        ours = query_attention(layer, call, call.get("hidden_states"), last, valid, llm_dims(lm.config))
    torch.testing.assert_close(ours, attentions[:, :, -1].float(), atol=1e-6, rtol=0)


@kinds
def test_layers_after_llm_layer_run_on_fewer_tokens(kind):
    model, batch = model_and_batch(kind)
    full = batch["input_ids"].shape[1]
    visual = [int((row == IMAGE_TOKEN).sum()) for row in batch["input_ids"]]  # 16 and 16
    meteor_plugin.enable(**STAGE3, llm_layer=2, llm_min_keep=4, llm_max_keep=4)
    seen = layer_lengths(model, lambda: logits(model, batch))
    # left padding: both rows keep 4 of their 16 visual tokens, so the compacted width is the longest row's less 12
    assert seen[0] == [full] and seen[1] == [full, full]  # layer 1 scores too (llm_score_layers='up_to')
    assert seen[2] == [full, full - 12] and seen[3] == [full - 12]
    stats = meteor_plugin.stats(model).stages
    assert [(s["llm"].entered, s["llm"].left) for s in stats] == [(v, 4) for v in visual]


@kinds
@pytest.mark.parametrize("stages", ["stage3", "all"])
def test_cached_generate_equals_greedy_without_cache(kind, stages, monkeypatch):
    model, batch = model_and_batch(kind, seed=3)
    if stages == "stage3":
        meteor_plugin.enable(**STAGE3, llm_min_keep=3, llm_max_keep=6, llm_lambda=30.0)
    else:  # Stage 1 inside the tower, Stage 3, proportional attention (the default "auto")
        meteor_plugin.enable(encoder_keep=0.5, llm_min_keep=2, llm_max_keep=5, llm_lambda=30.0)
    cached = generate(model, batch, steps=5)
    kept = [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages]
    assert all(s["llm"].left < s["llm"].entered for s in meteor_plugin.stats(model).stages)
    assert torch.equal(cached, greedy_without_cache(model, batch, 5, monkeypatch))
    assert [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages] == kept


@kinds
@pytest.mark.parametrize("stages", ["stage3", "all"])
def test_left_padded_batch_with_images_of_different_sizes_equals_each_sample_alone(kind, stages):
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind))
    # three prompts: a 8x8 image; a 4x8 then an 8x4 image; a 12x8 image (24 tokens)
    batch = qwen_batch(model, IMAGES + [[(1, (1, 12, 8))]], TAIL + [3], seed=5)
    fields = dict(STAGE3) if stages == "stage3" else {}
    meteor_plugin.enable(**fields, llm_lambda=40.0, llm_min_keep=2, llm_max_keep=0.5)
    together = generate(model, batch)
    kept = [(s.get("encoder") and s["encoder"].left, s["llm"].left) for s in meteor_plugin.stats(model).stages]
    assert len({k for _, k in kept}) > 1 or stages == "stage3"  # budgets differ per sample with Stage 1's ratio
    for i in range(3):
        alone = generate(model, sample_of(batch, model, i))
        s = meteor_plugin.stats(model).stages[0]
        assert torch.equal(together[i:i + 1], alone), f"sample {i}"
        assert (s.get("encoder") and s["encoder"].left, s["llm"].left) == kept[i]


# Stage 1 --------------------------------------------------------------------------------------------------------------
def placeholder_spy(model):
    """Record the input_ids the inner model matches its image features against (the prompt after fitting)."""
    seen = []
    original = model.model.get_placeholder_mask

    def spy(input_ids, *args, **kwargs):
        seen.append(input_ids)
        return original(input_ids, *args, **kwargs)

    model.model.get_placeholder_mask = spy
    return seen


@kinds
def test_stage1_prunes_inside_the_tower_and_the_language_model_gets_the_kept_tokens_at_their_positions(kind):
    model, batch = model_and_batch(kind)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rope, _ = model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    blocks = model.model.visual.blocks
    meteor_plugin.enable(**STAGE1, encoder_keep=0.5, spread_floor=0.0)
    fitted = placeholder_spy(model)
    rows = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: rows.update({i: o.shape[0]}))  # returns None
               for i, b in enumerate(blocks)]
    calls = language_model_inputs(model, lambda: logits(model, batch))
    for h in handles:
        h.remove()
    # 6 blocks: the shallow boundary (block 2) keeps 3/4 of each image's squares of 4 patches, the deep one (block 4)
    # half of them; Qwen2.5-VL's windows shrink with them
    patches = 4 * sum(merged_tokens(model, g) for g in batch["image_grid_thw"].tolist())
    assert [rows[i] for i in range(6)] == [patches] * 2 + [patches * 3 // 4] * 2 + [patches // 2] * 2
    stages = meteor_plugin.stats(model).stages
    assert [(s["encoder"].entered, s["encoder"].left) for s in stages] == [(16, 8), (16, 8)]
    # the language model's sequence lost exactly the dropped tokens, its placeholders are the features kept, and each
    # kept token sits at its unpruned (t, h, w)
    assert calls[0]["length"] == ids.shape[1] - 8 == fitted[0].shape[1]
    assert [int((row == IMAGE_TOKEN).sum()) for row in fitted[0]] == [8, 8]
    position_ids = calls[0]["position_ids"]
    for i, s in enumerate(stages):
        cols = torch.nonzero((ids[i] == IMAGE_TOKEN) & mask[i].bool()).flatten()
        runs = torch.split(cols, [merged_tokens(model, g) for g in sample_of(batch, model, i)["image_grid_thw"].tolist()])
        expected = torch.cat([rope[:, i, run[torch.tensor(k)]] for run, k in zip(runs, s["encoder"].detail["kept"])], 1)
        slots = torch.nonzero(fitted[0][i] == IMAGE_TOKEN).flatten()
        assert torch.equal(position_ids[1:, i, slots], expected), f"sample {i}"
        assert torch.equal(position_ids[1:, i, -TAIL[i]:], rope[:, i, -TAIL[i]:])  # the text after it did not move


@kinds
def test_stage1_keeping_every_token_equals_the_unpatched_model(kind):
    """Stage 1's plumbing (rows, rotary tables and segments handed to every block after a boundary, Qwen2.5-VL's
    merger output put back in image order) changes nothing when nothing is dropped."""
    model, batch = model_and_batch(kind)
    reference = logits(model, batch)
    meteor_plugin.enable(**STAGE1, encoder_keep=1.0)
    assert torch.equal(logits(model, batch), reference)
    assert [(s["encoder"].entered, s["encoder"].left) for s in meteor_plugin.stats(model).stages] == [(16, 16)] * 2


def test_qwen2_5_windows_attend_among_the_tokens_they_keep():
    """Qwen2.5-VL's windowed blocks get one segment per window that still has tokens, of its kept tokens' rows; its
    full-attention blocks one per image."""
    if _skip_reason("qwen2_5_vl"):
        pytest.skip(_skip_reason("qwen2_5_vl"))
    model, batch = model_and_batch("qwen2_5_vl")
    blocks = model.model.visual.blocks
    segments = {}
    handles = [b.attn.register_forward_pre_hook(  # what each block's attention really gets
        lambda m, a, k, i=i: segments.update({i: (k["cu_seqlens"].diff().tolist(), a[0].shape[0])}), with_kwargs=True)
        for i, b in enumerate(blocks)]
    meteor_plugin.enable(**STAGE1, encoder_keep=0.25, spread_floor=0.0)
    try:
        logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    # windows of 2x2 merged tokens: the 4x4 image has 4 windows, the 2x4 and 4x2 images 2 each
    assert segments[0][0] == [16] * 8 and segments[1][0] == [16] * 8
    for i in (3, 4):  # windowed blocks after the boundaries: rows of 4 patches per kept token, no empty window
        lengths, rows = segments[i]
        assert sum(lengths) == rows and all(n > 0 and n % 4 == 0 for n in lengths) and len(lengths) <= 8
    assert segments[5][0] == [16, 8, 8] and segments[2][0] == [40, 20, 20]  # full attention: one per image


@kinds
def test_stage1_generate_gives_back_the_users_prompt_and_equals_greedy_without_cache(kind, monkeypatch):
    model, batch = model_and_batch(kind, seed=4)
    meteor_plugin.enable(**STAGE1, encoder_keep=0.25)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(out[:, batch["input_ids"].shape[1]:], greedy_without_cache(model, batch, 4, monkeypatch))
    # the model's own rope_deltas describe the short prompt it ran: a cached continuation by hand stays in place
    assert [s["encoder"].left for s in meteor_plugin.stats(model).stages] == [4, 4]


def test_qwen3_deepstack_features_follow_the_kept_tokens():
    """Qwen3-VL adds a DeepStack feature to each visual token after each of its first decoder layers: once Stage 3
    compacted the sequence (at layer 1 here), exactly the kept tokens get exactly their own features."""
    if _skip_reason("qwen3_vl"):
        pytest.skip(_skip_reason("qwen3_vl"))
    model, batch = model_and_batch("qwen3_vl")
    with torch.no_grad():
        full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).deepstack_features
    full = [torch.cat(per_image) for per_image in full]
    lm_cls = type(model.model.language_model)
    real = lm_cls.__dict__["_deepstack_process"]
    added = []

    def spy(self, hidden, mask, embeds):
        added.append((mask.clone(), embeds.clone()))
        return real(self, hidden, mask, embeds)

    lm_cls._deepstack_process = spy  # under the plugin's wrapper, which enable() installs around it
    try:
        meteor_plugin.enable(**STAGE3, llm_layer=1, llm_min_keep=5, llm_max_keep=5)
        logits(model, batch)
        stages = meteor_plugin.stats(model).stages
        meteor_plugin.disable()
    finally:
        lm_cls._deepstack_process = real
    assert len(added) == 3  # after layers 0, 1, 2
    mask, embeds = added[0]
    assert mask.shape == batch["input_ids"].shape and torch.equal(embeds, full[0])
    offsets = [0, 16]  # sample 0's 16 visual tokens, then sample 1's
    rows = torch.cat([torch.tensor(s["llm"].detail["kept"]) + o for s, o in zip(stages, offsets)])
    for layer in (1, 2):
        mask, embeds = added[layer]
        assert mask.sum(dim=1).tolist() == [5, 5] and mask.shape[1] < batch["input_ids"].shape[1]
        torch.testing.assert_close(embeds, full[layer][rows], atol=0, rtol=0)


# Videos, baselines, refusals ------------------------------------------------------------------------------------------
@kinds
def test_video_tokens_are_pruned_by_stage3_and_refused_by_stage1_by_name(kind):
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind))
    batch = qwen_batch(model, [[(3, (2, 8, 8))]], [6], video=True)  # two temporal patches: 32 video tokens
    reference = logits(model, batch)
    meteor_plugin.enable(encoder=True)
    with pytest.raises(NotImplementedError, match=rf"Stage 1 does not prune the video inputs \(pixel_values_videos\) "
                                                  rf"of {CLASSES[kind]}Model.*set encoder=False"):
        logits(model, batch)
    meteor_plugin.enable(**STAGE3, llm_min_keep=6, llm_max_keep=6)
    seen = layer_lengths(model, lambda: logits(model, batch))
    llm = meteor_plugin.stats(model).stages[0]["llm"]
    assert (llm.entered, llm.left) == (32, 6)
    assert seen[3] == [batch["input_ids"].shape[1] - 26]
    meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    assert torch.equal(logits(model, batch), reference)
    assert VIDEO_TOKEN in batch["input_ids"]


@kinds
@pytest.mark.parametrize("method", ["random", "avgpool", "visionzip"])
def test_pre_llm_baselines_keep_fusion_keep_of_each_image(kind, method):
    model, batch = model_and_batch(kind)
    meteor_plugin.enable(method=method, encoder=False, fusion=False, llm=False, fusion_keep=0.25)
    fitted = placeholder_spy(model)
    logits(model, batch)
    stages = meteor_plugin.stats(model).stages
    # sample 0: 16 tokens -> 4; sample 1: two images of 8 tokens -> 2 each
    assert [(s["baseline"].entered, s["baseline"].left) for s in stages] == [(16, 4), (16, 4)]
    assert [int((row == IMAGE_TOKEN).sum()) for row in fitted[0]] == [4, 4]
    assert [len(k) for k in stages[1]["baseline"].detail["kept"]] == [2, 2]
    out = generate(model, batch, steps=2)
    assert out.shape == (2, 2)


@kinds
def test_fastv_runs_as_stage3_and_drop_encoder_is_refused_by_name(kind):
    model, batch = model_and_batch(kind)
    meteor_plugin.enable(method="fastv", encoder=False, fusion=False, llm=True, llm_max_keep=3, llm_min_keep=3)
    logits(model, batch)
    assert [s["llm"].left for s in meteor_plugin.stats(model).stages] == [3, 3]
    meteor_plugin.enable(method="drop_encoder", drop_encoder=0)
    with pytest.raises(NotImplementedError, match=rf"method='drop_encoder' .* on {CLASSES[kind]}ForConditionalGeneration: "
                       "it has one vision encoder"):
        logits(model, batch)


@kinds
def test_beam_search_and_loss_forwards_with_pruning_are_refused(kind):
    model, batch = model_and_batch(kind)
    meteor_plugin.enable()
    with pytest.raises(NotImplementedError, match="beam search"):
        generate(model, batch, num_beams=2)
    with pytest.raises(NotImplementedError, match="labels would not follow the pruned sequence"):
        model(**batch, labels=batch["input_ids"])
    with pytest.raises(NotImplementedError, match="generate without a cache runs a full forward per token"):
        generate(model, batch, use_cache=False)
    with pytest.raises(NotImplementedError, match="pass pixel_values, not mm_encoder_outputs"):
        encoded = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}
        model(**rest, mm_encoder_outputs={"image": encoded})
    with pytest.raises(NotImplementedError, match="pass input_ids, not inputs_embeds"):
        embeds = model.model.get_input_embeddings()(batch["input_ids"])
        rest = {k: v for k, v in batch.items() if k != "input_ids"}
        model(inputs_embeds=embeds, **rest)


def test_enable_patches_the_qwen_classes_this_transformers_has_and_nothing_on_older_stacks():
    """transformers 5.x: the three causal classes are pruned; the 4.x stacks (4.37.2, 4.44.2) have none of them:
    enable() patches nothing of the family there and says nothing."""
    import warnings

    from meteor_plugin.adapters import qwen_vl
    from meteor_plugin.registry import REGISTRY

    present = [name for name in ("Qwen2VL", "Qwen2_5_VL", "Qwen3VL")
               if hasattr(transformers, name + "ForConditionalGeneration")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meteor_plugin.enable()
    patched = sorted(o.__name__ for o, name in REGISTRY.patched() if name == "generate" and o.__name__.startswith("Qwen"))
    if generation() == "5":
        assert patched == sorted(n + "ForConditionalGeneration" for n in present) and len(present) == 3
    else:
        assert patched == [] and qwen_vl.FAMILY.refused == {}
    assert not [w for w in caught if "qwen" in str(w.message).lower()]


@kinds
def test_stage3_under_a_flash_attention_style_kernel_equals_each_sample_alone(kind):
    """A 2-D padding mask and no bias (FlashAttention-2's way, emulated on the CPU as in test_decoder_flash):
    the Qwen layers keep their M-RoPE tables and text positions through compaction, proportional attention runs
    there (its sizes in the key column, no warning), keeping everything equals the unpatched model, and a batch
    equals each sample."""
    import warnings

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from tests.stages.test_decoder_flash import NAME, cpu_flash_attention

    AttentionInterface.register(NAME, cpu_flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind, attn_implementation=NAME))
    model.config.vision_config._attn_implementation = "sdpa"  # the tower attends both ways; the emulation is causal
    batch = qwen_batch(model, IMAGES, TAIL, seed=6)
    reference = generate(model, batch)
    meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*proportional attention is off")
        assert torch.equal(generate(model, batch), reference)
    meteor_plugin.enable(**STAGE3, llm_min_keep=4, llm_max_keep=4)
    together = generate(model, batch)
    assert [s["llm"].left for s in meteor_plugin.stats(model).stages] == [4, 4]
    for i in range(2):
        assert torch.equal(together[i:i + 1], generate(model, sample_of(batch, model, i))), f"sample {i}"


@kinds
def test_a_text_only_sample_in_a_batch_with_images_equals_each_sample_alone(kind):
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind))
    batch = qwen_batch(model, [IMAGES[0], []], [5, 9], seed=1)
    meteor_plugin.enable(llm_min_keep=3, llm_max_keep=5, llm_lambda=30.0)
    together = generate(model, batch)
    stages = meteor_plugin.stats(model).stages
    assert (stages[0]["encoder"].left, stages[0]["llm"].left) == (8, 5) and "encoder" not in stages[1]
    assert torch.equal(together[:1], generate(model, sample_of(batch, model, 0)))
    text = {k: v for k, v in sample_of(batch, model, 1).items() if k not in ("pixel_values", "image_grid_thw")}
    assert torch.equal(together[1:], generate(model, text))
