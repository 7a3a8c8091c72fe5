"""The one place that decides what a model runs (``adapters/support.py``): what a method and the stage switches
prune on a model, and the refusal, by name and before the model runs, of what it cannot."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.adapters.support import Support, UnsupportedMethodError
from meteor_plugin.config import MeteorConfig
from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_hf_llava, hf_batch
from meteor_plugin.compat.transformers import generation

ONE_TOWER = Support("OneTower", frozenset({"encoder", "llm"}), {"drop_encoder": "it has one vision encoder"},
                    {"fusion": "has nothing to fuse"})
SEVERAL = Support("Several", frozenset({"encoder", "fusion", "llm"}))


def cfg(**fields):
    if fields.get("method") == "drop_encoder":
        fields.setdefault("drop_encoder", 0)
    return MeteorConfig(**fields)


@pytest.mark.parametrize("fields, support, plan", [
    ({}, ONE_TOWER, ("encoder", "llm")),  # the default: Stage 2 has nothing to fuse on one tower
    ({}, SEVERAL, ("encoder", "fusion", "llm")),
    (dict(encoder=False, fusion=False, llm=False), ONE_TOWER, ()),  # pruning off, as asked
    (dict(method="random", encoder=True, fusion=False, llm=False), ONE_TOWER, ("baseline",)),  # replaces Stages 1-2
    (dict(method="visionzip", llm=True), ONE_TOWER, ("baseline", "llm")),
    (dict(method="drop_encoder", llm=False), SEVERAL, ("baseline",)),
    (dict(method="fastv", encoder=False, fusion=False), SEVERAL, ("llm",)),
    (dict(method="fastv", encoder=True, fusion=True), SEVERAL, ("encoder", "fusion", "llm")),
])
def test_what_a_method_and_the_switches_prune(fields, support, plan):
    assert support.plan(cfg(**fields)) == plan


@pytest.mark.parametrize("fields, words", [
    (dict(method="drop_encoder"), ["method='drop_encoder'", "one vision encoder"]),
    (dict(method="fastv", llm=False), ["method='fastv'", "llm=False leaves Stage 3 off"]),
    (dict(encoder=False, fusion=True, llm=False), ["method='meteor'", "Stage 2 (fusion) has nothing to fuse",
                                                   "would run unpruned"]),
])
def test_a_combination_the_model_cannot_run_is_refused_naming_method_switches_and_class(fields, words):
    with pytest.raises(UnsupportedMethodError) as info:
        ONE_TOWER.plan(cfg(**fields))
    message = str(info.value)
    c = cfg(**fields)
    for word in words + ["OneTower", f"encoder={c.encoder}, fusion={c.fusion}, llm={c.llm}"]:
        assert word in message


def _tiny():
    model = build_tiny_hf_llava(TinyLlavaSpec())
    ids, mask, pixels = hf_batch([(3, 4)], visual_tokens=64 if generation() == "5" else 1)
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_the_refusal_comes_before_the_model_runs_in_forward_and_generate_and_disable_removes_the_check():
    model, inputs = _tiny()
    cls = type(model)
    before = {name: cls.__dict__.get(name) for name in ("forward", "generate")}
    towers = []
    tower = model.model.vision_tower if generation() == "5" else model.vision_tower  # 4.x: on the model itself
    handle = tower.register_forward_pre_hook(lambda *a: towers.append(1))
    try:
        with torch.no_grad():
            meteor_plugin.enable(method="drop_encoder", drop_encoder=0)
            for call in (lambda: model(**inputs), lambda: model.generate(**inputs, max_new_tokens=2)):
                with pytest.raises(UnsupportedMethodError, match="LlavaForConditionalGeneration"):
                    call()
            assert towers == []  # nothing ran: not the tower, not a baseline that would half-work
            meteor_plugin.disable()
            model(**inputs)
    finally:
        handle.remove()
    assert towers == [1]
    assert {name: cls.__dict__.get(name) for name in ("forward", "generate")} == before


def test_a_family_whose_support_refuses_a_method_is_refused_whatever_its_own_code_does(monkeypatch):
    """The check sits in front of the family's wrappers: a family that says it cannot run a method never sees it."""
    from meteor_plugin.adapters import hf_llava

    model, inputs = _tiny()
    refuses_random = Support(type(model).__name__, frozenset({"encoder", "llm"}), {"random": "the toy says so"})
    monkeypatch.setattr(hf_llava.TARGET, "support", lambda m: refuses_random, raising=False)
    with meteor_plugin.enabled(method="random"), pytest.raises(UnsupportedMethodError, match="the toy says so"):
        model(**inputs)
    with meteor_plugin.enabled(method="avgpool"), torch.no_grad():
        model(**inputs)  # what it supports runs


def test_proportional_attention_on_with_a_baseline_runs_where_the_family_places_its_tokens_and_is_refused_elsewhere():
    placing = Support("Placing", frozenset({"encoder", "fusion", "llm"}), placed=frozenset({"random", "visionzip"}))
    assert placing.plan(cfg(method="random", proportional_attention="on", llm=False)) == ("baseline",)
    assert SEVERAL.plan(cfg(method="random", llm=False)) == ("baseline",)  # "auto": as its paper runs it
    with pytest.raises(UnsupportedMethodError, match="Several.*places the kept tokens of no baseline"):
        SEVERAL.plan(cfg(method="random", proportional_attention="on"))
    with pytest.raises(UnsupportedMethodError, match="avgpool.*means over grid cells"):
        placing.plan(cfg(method="avgpool", proportional_attention="on"))


@pytest.mark.skipif(generation() != "5", reason="transformers' LLaVA prunes through the 5.x adapter here")
def test_transformers_llava_refuses_a_baseline_with_proportional_attention_on_instead_of_running_without_it():
    model = build_tiny_hf_llava(TinyLlavaSpec())
    ids, mask, pixels = hf_batch([(3, 5)])
    with meteor_plugin.enabled(method="random", fusion_keep=8, proportional_attention="on"):
        with pytest.raises(UnsupportedMethodError, match="LlavaForConditionalGeneration.*proportional_attention='on'"):
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
