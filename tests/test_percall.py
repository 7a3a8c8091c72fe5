"""Per-call state (issue 12, part 1 and items 2, 6, 7): one model serves many threads, a deep copy is an
independent model, and the paths around generate and ``prepare_inputs_labels_for_multimodal`` prune."""

import copy
import threading

import torch

import meteor_plugin
from meteor_plugin.testing.llava import make_batch

ALL_LLAVA = dict(encoder=True, fusion=False, llm=True, encoder_keep=0.5, llm_min_keep=4, llm_max_keep=12)
VISUAL = 64  # tokens per image of the default tiny LLaVA


def _greedy(model, ids, mask, images, steps=4):
    model.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=steps, do_sample=False,
                             num_beams=1, use_cache=True, pad_token_id=0)
    return out[:, -steps:]


def _logits(model, ids, mask, images):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images).logits


def _in_threads(count, work):
    """Run work(thread index) in ``count`` threads started together; re-raise the first error."""
    results, errors = [None] * count, []
    start = threading.Barrier(count)

    def run(i):
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _plugin_attributes(model):
    return sorted({f"{type(m).__name__}.{k}" for m in model.modules() for k in vars(m) if k.startswith("_meteor")})


def _hooks(model):
    """Every hook on every module, by module name (transformers registers some of its own)."""
    return {name: (list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
            for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks}


def _hook_names(model):
    return {name: [getattr(h, "__qualname__", type(h).__name__) for group in hooks for h in group]
            for name, hooks in _hooks(model).items()}


# Part 1: one model, many threads ------------------------------------------------------------------------------
def test_threads_generating_on_one_model_equal_each_sample_alone(tiny_llava):
    model = tiny_llava()
    meteor_plugin.enable(**ALL_LLAVA)
    prompts = [make_batch([(2 + i % 3, 3 + i % 4)], [True], seed=i) for i in range(8)]
    alone = [_greedy(model, *p) for p in prompts]
    kept_alone = []
    for p in prompts:
        _greedy(model, *p)
        kept_alone.append(meteor_plugin.stats(model).stages[0]["llm"].left)

    def work(i):
        got = []
        for _ in range(5):
            tokens = _greedy(model, *prompts[i])
            got.append((tokens, meteor_plugin.stats(model).stages[0]["llm"].left))
        return got

    for i, runs in enumerate(_in_threads(8, work)):
        for tokens, kept in runs:
            assert torch.equal(tokens, alone[i]), f"thread {i}"
            assert kept == kept_alone[i], f"thread {i}: stats of another thread's run"
    assert _plugin_attributes(model) == []


def test_threads_forwarding_two_models_with_their_own_configs_equal_each_alone(tiny_llava):
    models = [tiny_llava(), tiny_llava(seed=3)]
    meteor_plugin.attach(models[0], meteor_plugin.MeteorConfig(**ALL_LLAVA))
    meteor_plugin.attach(models[1], meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=1,
                                                               llm_min_keep=2, llm_max_keep=6))
    meteor_plugin.enable()  # each model its own config
    batches = [make_batch([(3, 4), (2, 6)], [True, True], seed=10 + i) for i in range(4)]
    alone = {(m, b): _logits(models[m], *batches[b]) for m in range(2) for b in range(4)}

    def work(i):
        out = []
        for step in range(3):
            m, b = (i + step) % 2, (i * 3 + step) % 4
            out.append((m, b, _logits(models[m], *batches[b])))
        return out

    for runs in _in_threads(8, work):
        for m, b, logits in runs:
            assert torch.equal(logits, alone[(m, b)]), f"model {m} batch {b}"


def test_threads_on_the_eagle_stand_in_with_all_three_stages_equal_each_alone():
    from meteor_plugin.adapters.eagle import convert_to_post_projection
    from meteor_plugin.testing.eagle_like import build_tiny_eagle

    model = build_tiny_eagle()
    convert_to_post_projection(model)
    meteor_plugin.enable(encoder=True, fusion=True, llm=True, encoder_keep=0.3, fusion_keep=0.5, llm_min_keep=4,
                         llm_max_keep=16, encoder_ranks={"clip-448": 10.0, "convnext-1024": 30.0,
                                                         "sam-1024": 20.0, "pix2struct-1024": 40.0})
    prompts = [make_batch([(2 + i, 4)], [True], image_size=128, seed=i) for i in range(4)]
    alone = [_greedy(model, *p, steps=3) for p in prompts]
    stages = meteor_plugin.stats(model).stages[0]
    assert {"encoder", "fusion", "llm"} <= set(stages)

    def work(i):
        return [_greedy(model, *prompts[i], steps=3) for _ in range(2)]

    for i, runs in enumerate(_in_threads(4, work)):
        for tokens in runs:
            assert torch.equal(tokens, alone[i]), f"thread {i}"
    assert _plugin_attributes(model) == []


def test_stats_belong_to_the_calling_thread(tiny_llava):
    model = tiny_llava()
    meteor_plugin.enable(**ALL_LLAVA)
    small = make_batch([(2, 3)], [True], seed=0)
    large = make_batch([(2, 3), (4, 5)], [True, True], seed=1)
    _logits(model, *small)
    _in_threads(1, lambda i: _logits(model, *large))
    assert meteor_plugin.stats(model).batch_size == 1  # this thread's last run, not the other thread's


# Item 2: deepcopy ----------------------------------------------------------------------------------------------
def test_deepcopy_while_enabled_is_independent_and_clean_after_disable(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 4), (2, 6)], [True, True], seed=2)
    reference = _logits(model, ids, mask, images)
    own_hooks = _hook_names(model)
    meteor_plugin.enable(**ALL_LLAVA)
    pruned = _logits(model, ids, mask, images)
    twin = copy.deepcopy(model)
    assert torch.equal(_logits(twin, ids, mask, images), pruned)
    one = make_batch([(5, 2)], [True], seed=3)
    assert torch.equal(_logits(twin, *one), _logits(model, *one))  # the copy keeps no selection of its own
    meteor_plugin.disable()
    for m in (twin, model):
        assert _hook_names(m) == own_hooks and _plugin_attributes(m) == []
        assert torch.equal(_logits(m, ids, mask, images), reference)
    later = copy.deepcopy(model)
    assert torch.equal(_logits(later, ids, mask, images), reference)


# Item 6: prepare_inputs_labels_for_multimodal, then forward(inputs_embeds=...) --------------------------------
def test_forward_on_embeds_from_prepare_prunes_like_the_plain_forward(tiny_llava):
    model = tiny_llava()
    meteor_plugin.enable(**ALL_LLAVA)
    ids, mask, images = make_batch([(3, 4), (2, 6)], [True, True], seed=4)
    plain = _logits(model, ids, mask, images)
    plain_stats = meteor_plugin.stats(model).to_dict()
    with torch.no_grad():
        _, position_ids, attention, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, images)
        logits = model(inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids).logits
    assert torch.equal(logits, plain)
    assert meteor_plugin.stats(model).to_dict() == plain_stats
    assert meteor_plugin.stats(model).stages[0]["llm"].left < VISUAL


def test_forward_on_embeds_made_elsewhere_does_not_claim_no_visual_tokens(tiny_llava):
    model = tiny_llava()
    meteor_plugin.enable(**ALL_LLAVA)
    ids, mask, images = make_batch([(3, 4)], [True], seed=4)
    with torch.no_grad():
        _, _, attention, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)
        model(inputs_embeds=embeds.clone(), attention_mask=attention)
    run = meteor_plugin.stats(model)
    assert "no visual tokens" not in run.summary()
    assert any("inputs_embeds" in note for note in run.notes)


# Item 7: sampling with several sequences per prompt ------------------------------------------------------------
def test_sampling_several_sequences_per_prompt_runs_pruned(tiny_llava):
    model = tiny_llava()
    model.generation_config.eos_token_id = None
    meteor_plugin.enable(**ALL_LLAVA)
    ids, mask, images = make_batch([(3, 4), (2, 6)], [True, True], pad_side="left", seed=5)
    model.config.tokenizer_padding_side = "left"
    seen = []  # (layer, shape of its output hidden states)

    def grab(module, args, output, i):
        seen.append((i, tuple((output[0] if isinstance(output, tuple) else output).shape)))

    handles = [layer.register_forward_hook(lambda m, a, o, i=i: grab(m, a, o, i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=True,
                                 num_return_sequences=2, use_cache=True, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[0] == 4  # 2 sequences for each of 2 prompts
    run = meteor_plugin.stats(model)
    assert run.batch_size == 4
    kept = [s["llm"].left for s in run.stages]
    assert kept[0] == kept[1] and kept[2] == kept[3] and max(kept) < VISUAL
    prefill = [shape for _, shape in seen[:len(model.model.layers)]]
    full = prefill[0][1]
    assert [s[0] for s in prefill] == [4] * len(prefill)
    assert all(s[1] == full for s in prefill[:2]) and all(s[1] < full for s in prefill[2:])  # output of llm_layer=2 on
