"""Stage 3 (text-guided pruning inside the LLM) on a tiny LLaVA, against the unpatched model.

The guarantees a family must keep (pruning off equals unpatched, fewer tokens after ``llm_layer``, cached
equals uncached, a batch equals its samples alone, disable restores) run for each of the llava package's
language models: Llama (LLaVA-1.5, 1.6-vicuna) and Mistral (1.6-mistral).
"""

import pytest
import torch

import meteor_plugin
from meteor_plugin.testing.llm import input_lengths
from meteor_plugin.testing.llava import IMAGE_TOKEN_INDEX, make_batch

VISUAL = 64  # tokens per image of the default tiny LLaVA
LANGUAGES = pytest.mark.parametrize("language", ["llama", "mistral"])
STAGE3 = dict(encoder=False, fusion=False, llm=True)


def generated(out: torch.Tensor, steps: int) -> torch.Tensor:
    """generate() returns only new tokens (4.37 adds a leading BOS): keep the last ``steps``."""
    return out[:, -steps:]


def greedy_without_cache(model, ids, mask, images, steps):
    """Greedy decoding by full forwards with no KV cache.

    The generated tokens are passed as labels, i.e. as answer tokens, which Stage 3 never uses as its
    query: every forward then selects the same visual tokens as the prefill of a cached generate.
    """
    prompt = ids.shape[1]
    for _ in range(steps):
        labels = torch.full_like(ids, -100)
        labels[:, prompt:] = ids[:, prompt:]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, images=images, labels=labels, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, prompt:]


def greedy_generate(model, ids, mask, images, steps):
    model.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=steps, do_sample=False,
                             num_beams=1, use_cache=True, pad_token_id=0)
    return generated(out, steps)


def forward_logits(model, ids, mask, images):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images).logits


# Pruning off equals the unpatched model -------------------------------------------------------------------
@LANGUAGES
@pytest.mark.parametrize("how", ["stages_off", "keep_everything"])
def test_pruning_off_matches_unpatched(tiny_llava, how, language):
    model = tiny_llava(language=language)
    ids, mask, images = make_batch([(4, 6), (3, 9)], [True, True], seed=1)
    ref_logits = forward_logits(model, ids, mask, images)
    ref_tokens = greedy_without_cache(model, ids[:1], mask[:1], images[:1], 5)
    if how == "stages_off":
        meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    else:
        meteor_plugin.enable(**STAGE3, llm_min_keep=1.0, llm_max_keep=1.0)
    logits = forward_logits(model, ids, mask, images)
    assert logits.shape == ref_logits.shape
    # Compare real tokens; logits at padding positions mean nothing (right padding: the row's tail).
    for i, n in enumerate((mask.sum(1) - 1 + VISUAL).tolist()):
        torch.testing.assert_close(logits[i, :n], ref_logits[i, :n], atol=1e-5, rtol=0)
    assert torch.equal(greedy_generate(model, ids[:1], mask[:1], images[:1], 5), ref_tokens)
    if how == "keep_everything":
        llm = meteor_plugin.stats(model).stages[0]["llm"]
        assert (llm.entered, llm.left) == (VISUAL, VISUAL)


def test_unpatched_generate_matches_reference_loop(tiny_llava):
    """The reference loop itself agrees with upstream generate where upstream generate works."""
    from meteor_plugin.compat.transformers import generation

    if generation() == "4.44":
        pytest.skip("unpatched LLaVA generate raises on transformers 4.38-5.3 (cache_position): nothing to compare")
    model = tiny_llava()
    ids, mask, images = make_batch([(4, 6)], [True], seed=1)
    assert torch.equal(greedy_generate(model, ids, mask, images, 5), greedy_without_cache(model, ids, mask, images, 5))


# Patching --------------------------------------------------------------------------------------------------
@LANGUAGES
def test_disable_restores_original_functions_and_enable_is_idempotent(tiny_llava, language):
    from meteor_plugin.registry import REGISTRY

    model = tiny_llava(language=language)
    LlavaLlamaForCausalLM, LlavaLlamaModel = type(model), type(model.model)  # noqa: N806 (the classes)
    before = {name: LlavaLlamaForCausalLM.__dict__.get(name) for name in
              ("forward", "generate", "encode_images", "prepare_inputs_labels_for_multimodal")}
    model_forward_owned = "forward" in LlavaLlamaModel.__dict__
    meteor_plugin.enable(**STAGE3)
    patched = LlavaLlamaForCausalLM.forward
    assert patched is not before["forward"]
    count = len(REGISTRY.patched())
    meteor_plugin.enable(**STAGE3, llm_max_keep=0.1)
    assert LlavaLlamaForCausalLM.forward is patched
    assert len(REGISTRY.patched()) == count
    layer_cls = type(model.model.layers[0])
    layer_forward = layer_cls.__dict__["forward"]
    ids, mask, images = make_batch([(2, 5)], [True])
    forward_logits(model, ids, mask, images)
    assert layer_cls.__dict__["forward"] is not layer_forward  # Stage 3 runs in the layer class's forward
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)  # no per-model hooks
    meteor_plugin.disable()
    for name, original in before.items():
        assert LlavaLlamaForCausalLM.__dict__.get(name) is original, name
    assert ("forward" in LlavaLlamaModel.__dict__) == model_forward_owned
    assert layer_cls.__dict__["forward"] is layer_forward
    assert REGISTRY.patched() == []


# Decoder layers after llm_layer see the shortened sequence --------------------------------------------------
@LANGUAGES
def test_layers_after_llm_layer_run_on_fewer_tokens(tiny_llava, language):
    model = tiny_llava(language=language)
    ids, mask, images = make_batch([(3, 7)], [True])
    full = ids.shape[1] - 1 + VISUAL
    meteor_plugin.enable(**STAGE3, llm_layer=2, llm_min_keep=16, llm_max_keep=16)
    keys = [layer.self_attn.k_proj for layer in model.model.layers]
    seen = input_lengths(keys, lambda: forward_logits(model, ids, mask, images))
    # Layer 2's own k_proj is called twice: once by the scorer on the full input, once on the compacted one.
    # Layer 1's too (llm_signal_layers="up_to": its budget signal joins the mean); layer 0 never scores.
    assert seen[0] == [full] and seen[1] == [full, full]
    assert seen[2] == [full, full - VISUAL + 16]
    assert seen[3] == [full - VISUAL + 16]
    meteor_plugin.enable(**STAGE3, llm_layer=2, llm_min_keep=16, llm_max_keep=16, llm_signal_layers="own",
                         llm_score_layers="own")
    seen = input_lengths(keys, lambda: forward_logits(model, ids, mask, images))
    assert seen[1] == [full] and seen[2] == [full, full - VISUAL + 16]  # the signal of Stage 3's layer alone


# KV cache ---------------------------------------------------------------------------------------------------
@LANGUAGES
@pytest.mark.parametrize("query", ["all", "last"])
def test_cached_generate_equals_greedy_without_cache(tiny_llava, query, language):
    model = tiny_llava(padding_side="left", language=language)
    ids, mask, images = make_batch([(4, 8), (2, 5)], [True, True], pad_side="left", seed=3)
    meteor_plugin.enable(**STAGE3, llm_min_keep=12, llm_max_keep=20, llm_lambda=30.0, text_query=query)
    steps = 6
    cached = greedy_generate(model, ids, mask, images, steps)
    kept_at_prefill = [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages]
    reference = greedy_without_cache(model, ids, mask, images, steps)
    assert torch.equal(cached, reference)
    assert [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages] == kept_at_prefill
    assert all(s["llm"].left < VISUAL for s in meteor_plugin.stats(model).stages)


def test_beam_search_is_refused_with_stage3(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(2, 4)], [True])
    meteor_plugin.enable(**STAGE3)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, images=images, max_new_tokens=2, num_beams=2)


# Batches -----------------------------------------------------------------------------------------------------
@LANGUAGES
@pytest.mark.parametrize("input_padding", ["left", "right"])
def test_batch_generate_equals_each_sample_alone(tiny_llava, input_padding, language):
    model = tiny_llava(padding_side="left", language=language)  # the spliced sequence is re-padded on this side
    lengths = [(3, 4), (5, 11), (2, 7)]
    ids, mask, images = make_batch(lengths, [True, True, True], pad_side=input_padding, seed=5)
    meteor_plugin.enable(**STAGE3, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    steps = 5
    batch = greedy_generate(model, ids, mask, images, steps)
    batch_kept = [s["llm"].left for s in meteor_plugin.stats(model).stages]
    for i in range(3):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = greedy_generate(model, row, torch.ones_like(row), images[i:i + 1], steps)
        assert torch.equal(batch[i:i + 1], alone), f"sample {i}"
        assert meteor_plugin.stats(model).stages[0]["llm"].left == batch_kept[i]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_forward_with_text_only_sample_equals_each_sample_alone(tiny_llava, padding_side):
    model = tiny_llava(padding_side=padding_side)
    ids, mask, images = make_batch([(3, 6), (4, 9), (2, 3)], [True, False, True], seed=7)
    meteor_plugin.enable(**STAGE3, llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    # position_ids make LLaVA number each sample from 0 after re-padding (it returns None otherwise)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=images, position_ids=ids.clone()).logits
    run = meteor_plugin.stats(model)
    assert run.stages[1] == {} or run.stages[1]["llm"].entered == 0
    widths = run.layer_tokens[-1]
    for i in range(3):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = forward_logits(model, row, torch.ones_like(row), images[i:i + 1])[0]
        n = widths[i]
        assert alone.shape[0] == n
        mine = logits[i, -n:] if padding_side == "left" else logits[i, :n]
        torch.testing.assert_close(mine, alone, atol=2e-5, rtol=1e-4)


# Attention implementations -----------------------------------------------------------------------------------
def test_sdpa_and_eager_select_the_same_tokens(tiny_llava):
    ids, mask, images = make_batch([(3, 6), (2, 12)], [True, True], seed=11)
    kept = {}
    for impl in ("sdpa", "eager"):
        model = tiny_llava(attn_implementation=impl)
        meteor_plugin.enable(**STAGE3, llm_lambda=25.0, llm_min_keep=4, llm_max_keep=40)
        forward_logits(model, ids, mask, images)
        kept[impl] = [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages]
        meteor_plugin.disable()
    assert kept["sdpa"] == kept["eager"]
    assert all(0 < len(k) < VISUAL for k in kept["sdpa"])


def test_recomputed_scores_equal_eager_attention_weights(tiny_llava):
    """The score rows built from layer K's q/k equal the attention the eager layer itself computes."""
    from meteor_plugin.compat.transformers import LayerCall
    from meteor_plugin.stages.decoder import llm_dims, query_attention

    model = tiny_llava(attn_implementation="eager")
    ids, mask, images = make_batch([(3, 6), (2, 9)], [True, True], pad_side="right", seed=13)
    captured = {}
    layer_k = model.model.layers[2]

    def grab(mod, args, kwargs):
        captured["call"] = LayerCall(mod, args, kwargs)

    handle = layer_k.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, images=images, output_attentions=True)
    finally:
        handle.remove()
    weights = out.attentions[2]  # (B, H, L, L)
    call = captured["call"]
    hidden = call.get("hidden_states")
    b, length = hidden.shape[:2]
    valid = torch.zeros(b, length, dtype=torch.bool)
    query = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate(mask.sum(1).tolist()):
        total = n - 1 + VISUAL
        valid[i, :total] = True
        query[i, total - 5:total] = True
    with torch.no_grad():
        probs = query_attention(layer_k, call, hidden, query, valid, llm_dims(model.config))
    for i in range(b):
        rows = weights[i][:, query[i]]  # (H, Q, L)
        expected = rows.mean(dim=1)
        torch.testing.assert_close(probs[i][:, valid[i]], expected[:, valid[i]], atol=1e-5, rtol=1e-4)


# Adaptive budget ---------------------------------------------------------------------------------------------
def test_budget_follows_attention_mass_and_respects_clips(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 6), (5, 10), (2, 4)], [True, True, False], seed=17)
    STAGE3 = dict(encoder=False, fusion=False, llm=True, llm_budget_signal="mass")  # the paper's signal
    meteor_plugin.enable(**STAGE3, llm_lambda=20.0, llm_min_keep=2, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    stages = meteor_plugin.stats(model).stages
    for sample in stages[:2]:
        llm = sample["llm"]
        expected = int(torch.floor(torch.tensor(llm.detail["mass"] * 20.0 + 0.5)))
        assert llm.left == max(2, min(VISUAL, expected))
        assert len(llm.detail["kept"]) == llm.left
    assert stages[2]["llm"].entered == 0 and stages[2]["llm"].left == 0  # the text-only sample
    masses = [s["llm"].detail["mass"] for s in stages[:2]]
    # A larger lambda keeps proportionally more; the clips bound it.
    meteor_plugin.enable(**STAGE3, llm_lambda=60.0, llm_min_keep=2, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    for mass, sample in zip(masses, meteor_plugin.stats(model).stages[:2]):
        assert sample["llm"].detail["mass"] == pytest.approx(mass)
        assert sample["llm"].left == max(2, min(VISUAL, int(mass * 60.0 + 0.5)))
    meteor_plugin.enable(**STAGE3, llm_lambda=1000.0, llm_min_keep=2, llm_max_keep=24)
    forward_logits(model, ids, mask, images)
    assert [s["llm"].left for s in meteor_plugin.stats(model).stages[:2]] == [24, 24]
    meteor_plugin.enable(**STAGE3, llm_lambda=0.001, llm_min_keep=0.25, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    assert [s["llm"].left for s in meteor_plugin.stats(model).stages[:2]] == [16, 16]


def test_top_heads_have_the_highest_visual_attention(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 6)], [True], seed=19)
    meteor_plugin.enable(**STAGE3, llm_top_heads=2, llm_min_heads=1)
    forward_logits(model, ids, mask, images)
    llm = meteor_plugin.stats(model).stages[0]["llm"]
    assert len(llm.detail["heads"]) == 2
    # The floor wins over a ratio that resolves to fewer heads, and never exceeds the model's heads.
    for top, floor, used in ((0.25, 1, 1), (0.25, 3, 3), (2, 9, 4)):
        meteor_plugin.enable(**STAGE3, llm_top_heads=top, llm_min_heads=floor)
        forward_logits(model, ids, mask, images)
        assert len(meteor_plugin.stats(model).stages[0]["llm"].detail["heads"]) == used


def test_spread_budget_is_lambda_times_the_attention_perplexity(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 6), (5, 10)], [True, True], seed=17)
    meteor_plugin.enable(**STAGE3, llm_budget_signal="spread", llm_lambda=0.5, llm_min_keep=2, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    for sample in meteor_plugin.stats(model).stages:
        llm = sample["llm"]
        assert 1.0 <= llm.detail["signal"] <= llm.entered
        assert llm.left == max(2, min(llm.entered, int(llm.detail["signal"] * 0.5 + 0.5)))


def test_regions_budget_is_lambda_times_the_attended_regions_and_never_above_the_spread(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 6), (5, 10)], [True, True], seed=17)
    meteor_plugin.enable(**STAGE3, llm_budget_signal="spread", llm_min_keep=2, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    spread = [s["llm"].detail["signal"] for s in meteor_plugin.stats(model).stages]
    meteor_plugin.enable(**STAGE3, llm_budget_signal="regions", llm_lambda=3.0, llm_min_keep=2, llm_max_keep=1.0)
    forward_logits(model, ids, mask, images)
    for sample, tokens in zip(meteor_plugin.stats(model).stages, spread):
        llm = sample["llm"]
        # order-2 diversity with similarity <= order-2 perplexity <= perplexity (Hill numbers fall with order)
        assert 1.0 <= llm.detail["signal"] <= tokens + 1e-4
        assert llm.left == max(2, min(llm.entered, int(llm.detail["signal"] * 3.0 + 0.5)))


def test_coverage_budget_is_the_mean_signal_up_to_stage3_and_keeps_the_covering_tokens(tiny_llava):
    """Version 6's Stage 3, recomputed from each layer's own input: the coverage signal of layers 1 and 2
    (each from its own norm and q/k), their mean times lambda, clipped, is the budget; the kept tokens are those
    that cover most of layer 2's attention (``core.coverage``), not the most attended."""
    from meteor_plugin.compat.transformers import LayerCall
    from meteor_plugin.core.coverage import coverage_count, coverage_keep
    from meteor_plugin.core.text_attention import select_heads
    from meteor_plugin.stages import decoder
    from meteor_plugin.stages.decoder import check_against_model, llm_dims, query_attention

    model = tiny_llava()
    ids, mask, images = make_batch([(3, 6), (5, 10)], [True, True], seed=17)
    # The selection on layer 2's attention alone first (llm_score_layers="own"), then on the mean (below)
    cfg = dict(STAGE3, llm_layer=2, llm_lambda=0.5, llm_min_keep=3, llm_max_keep=1.0, llm_score_layers="own")
    calls, masks = {}, {}
    def grab(mod, args, kwargs):
        calls.setdefault(list(model.model.layers).index(mod), LayerCall(mod, args, kwargs))

    hooks = [model.model.layers[i].register_forward_pre_hook(grab, with_kwargs=True) for i in (1, 2)]
    select = decoder.DecoderPruner._select

    def spy(self, plan, *args):
        masks.update(visual=plan.layout.visual & plan.valid, query=plan.layout.query & plan.valid, valid=plan.valid)
        return select(self, plan, *args)

    decoder.DecoderPruner._select = spy
    try:
        meteor_plugin.enable(**cfg)
        forward_logits(model, ids, mask, images)
    finally:
        decoder.DecoderPruner._select = select
        for h in hooks:
            h.remove()
    stages = meteor_plugin.stats(model).stages
    heads = check_against_model(meteor_plugin.MeteorConfig(**cfg), model.config)
    signals, scores, normed = [], [], None
    with torch.no_grad():
        for i in (1, 2):
            layer, call = model.model.layers[i], calls[i]
            hidden = call.get("hidden_states")
            normed = layer.input_layernorm(hidden)
            attn = query_attention(layer, call, hidden, masks["query"], masks["valid"], llm_dims(model.config))
            scores.append(select_heads(attn, masks["visual"], heads).scores)
            signals.append(coverage_count(scores[-1], masks["visual"], normed, 0.75))
    mean = (signals[0] + signals[1]) / 2
    budget = torch.clamp(torch.floor(mean.double() * 0.5 + 0.5).long(), min=3, max=VISUAL)
    kept = coverage_keep(scores[1], budget, masks["visual"], normed)
    for i, sample in enumerate(stages):
        llm = sample["llm"]
        assert llm.detail["signal"] == pytest.approx(float(mean[i]), rel=1e-5)
        assert llm.left == int(budget[i]) and 3 <= llm.left < VISUAL
        assert llm.detail["kept"] == torch.nonzero(kept[i][masks["visual"][i]]).flatten().tolist()
    # llm_score_layers="up_to": the tokens that cover the mean of both layers' attention, each over the image.
    meteor_plugin.enable(**{**cfg, "llm_score_layers": "up_to"})
    forward_logits(model, ids, mask, images)
    on_image = [(s * masks["visual"]) / (s * masks["visual"]).sum(dim=1, keepdim=True) for s in scores]
    kept = coverage_keep((on_image[0] + on_image[1]) / 2, budget, masks["visual"], normed)
    for i, sample in enumerate(meteor_plugin.stats(model).stages):
        assert sample["llm"].left == int(budget[i])
        assert sample["llm"].detail["kept"] == torch.nonzero(kept[i][masks["visual"][i]]).flatten().tolist()
    # The paper's top-K on the same attention keeps other tokens (here, at least).
    meteor_plugin.enable(**cfg, llm_selection="top")
    forward_logits(model, ids, mask, images)
    top = [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages]
    assert [len(t) for t in top] == [s["llm"].left for s in stages] and top != [s["llm"].detail["kept"] for s in stages]


# Training ------------------------------------------------------------------------------------------------------
def _training_batch(answer_seed=0):
    ids, mask, images = make_batch([(3, 5), (2, 8)], [True, True], seed=23)
    g = torch.Generator().manual_seed(answer_seed)
    answers = torch.randint(3, 256, (2, 4), generator=g)
    ids = torch.cat([ids, answers], dim=1)
    mask = torch.cat([mask, torch.ones_like(answers)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = answers
    return ids, mask, images, labels


def test_training_loss_equals_reference_on_kept_positions(tiny_llava):
    model = tiny_llava()
    model.train()
    ids, mask, images, labels = _training_batch()
    # Both rows are full length (answers appended after right padding is removed by LLaVA).
    meteor_plugin.enable(**STAGE3, llm_min_keep=10, llm_max_keep=10)
    out = model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
    stages = meteor_plugin.stats(model).stages
    # Reference: expand the labels like LLaVA does, drop the pruned visual positions, shift, cross-entropy.
    losses, count = 0.0, 0
    logits = out.logits.float()
    for i in range(2):
        row_ids = ids[i][mask[i].bool()]
        row_labels = labels[i][mask[i].bool()]
        pos = int((row_ids == IMAGE_TOKEN_INDEX).nonzero())
        kept = stages[i]["llm"].detail["kept"]
        expanded = torch.cat([row_labels[:pos], torch.full((len(kept),), -100), row_labels[pos + 1:]])
        n = expanded.shape[0]
        rows = logits[i, :n]
        target = expanded[1:]
        sel = target != -100
        losses = losses + torch.nn.functional.cross_entropy(rows[:-1][sel], target[sel], reduction="sum")
        count += int(sel.sum())
    reference = losses / count
    torch.testing.assert_close(out.loss.float(), reference, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for i in (0, 1, 3):
        grad = model.model.layers[i].self_attn.q_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"layer {i}"


def test_answer_tokens_never_choose_visual_tokens(tiny_llava):
    model = tiny_llava()
    meteor_plugin.enable(**STAGE3, llm_lambda=30.0, llm_min_keep=4, llm_max_keep=40, text_query="all")
    kept = []
    for answer_seed in (0, 1):
        ids, mask, images, labels = _training_batch(answer_seed)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
        run = meteor_plugin.stats(model)
        kept.append([(s["llm"].left, s["llm"].detail["kept"]) for s in run.stages])
        assert [s["llm"].detail["query_tokens"] for s in run.stages] == [5, 8]
    assert kept[0] == kept[1]


def test_gradient_checkpointing_gives_the_same_loss_and_selection(tiny_llava):
    ids, mask, images, labels = _training_batch()
    meteor_plugin.enable(**STAGE3, llm_lambda=30.0, llm_min_keep=4, llm_max_keep=40)
    results = []
    for checkpointing in (False, True):
        model = tiny_llava()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        out = model(input_ids=ids, attention_mask=mask, images=images, labels=labels, use_cache=False)
        out.loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append((out.loss.detach(), [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages], grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][2], results[1][2], atol=1e-6, rtol=1e-4)


# Errors --------------------------------------------------------------------------------------------------------
def test_llm_layer_beyond_the_model_is_a_clear_error(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(2, 4)], [True])
    meteor_plugin.enable(**STAGE3, llm_layer=4)
    with pytest.raises(ValueError, match=r"llm_layer=4 .*allowed 1\.\.3"):
        forward_logits(model, ids, mask, images)
    meteor_plugin.enable(**STAGE3, llm_top_heads=9)
    with pytest.raises(ValueError, match=r"llm_top_heads=9 .*allowed 1\.\.4"):
        forward_logits(model, ids, mask, images)


@pytest.mark.parametrize("stages", [dict(encoder=False, fusion=False, llm=False), STAGE3])
def test_a_batch_whose_answers_are_all_truncated_away_is_refused(tiny_llava, stages):
    """--model_max_length below the visual tokens plus the text: upstream cuts every answer after the
    splice, and without the check the run trains on nothing with loss 0."""
    from meteor_plugin.adapters.shared.llava_arch import AllLabelsMaskedError

    model = tiny_llava()
    model.train()
    ids, mask, images, labels = _training_batch()
    meteor_plugin.enable(**stages)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss)
    model.config.tokenizer_model_max_length = int((ids[0] != IMAGE_TOKEN_INDEX).sum())  # the answers fall off
    with pytest.raises(AllLabelsMaskedError, match="tokenizer_model_max_length=.*--model_max_length"):
        model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
    with pytest.raises(AllLabelsMaskedError, match="has no answer tokens at all"):
        model(input_ids=ids, attention_mask=mask, images=images, labels=torch.full_like(labels, -100))
