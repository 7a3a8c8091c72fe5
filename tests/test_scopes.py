"""Scopes, like peft's: ``with meteor_plugin.enabled(config):`` and ``with meteor_plugin.disabled():`` for one block
(this thread), ``attach(model)`` / ``detach(model)`` for one model; library code never flips the user's switch."""

import threading

import pytest
import torch

import meteor_plugin
from meteor_plugin import MeteorConfig
from meteor_plugin.registry import REGISTRY
from meteor_plugin.runtime import ACTIVE
from meteor_plugin.testing.llava import make_batch

STAGE3 = MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=1, llm_min_keep=4, llm_max_keep=4)
OTHER = STAGE3.replace(llm_min_keep=8, llm_max_keep=8)
VISUAL = 64  # tokens per image of the default tiny LLaVA


def _layer_lengths(model, batch):
    """The sequence length each decoder layer ran on in this thread (read by hooks), and the logits."""
    seen, handles, me = [], [], threading.get_ident()

    def record(module, args, kwargs):
        seen.append((threading.get_ident(), (args[0] if args else kwargs["hidden_states"]).shape[1]))

    for layer in model.get_model().layers:  # the attention's input: after the layer's own compaction
        handles.append(layer.self_attn.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=batch[0], attention_mask=batch[1], images=batch[2]).logits
    finally:
        for handle in handles:
            handle.remove()
    return [length for thread, length in seen if thread == me], logits


def _full(batch):
    return batch[0].shape[1] - 1 + VISUAL


def _pruned(model, batch, keep):
    """The lengths with Stage 3 keeping ``keep`` visual tokens from layer 1 on."""
    layers = len(model.get_model().layers)
    return [_full(batch)] + [_full(batch) - VISUAL + keep] * (layers - 1)


def test_enabled_restores_exactly_what_was_there_on_exit_on_an_exception_and_nests(tiny_llava):
    model = tiny_llava()
    batch = make_batch([(2, 3)], [True])
    reference_lengths, reference = _layer_lengths(model, batch)
    assert REGISTRY.patched() == [] and not meteor_plugin.is_enabled()
    with meteor_plugin.enabled(STAGE3) as config:
        assert config == STAGE3 and meteor_plugin.is_enabled() and not ACTIVE.enabled
        assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 4)
        with meteor_plugin.enabled(OTHER):
            assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 8)
            with meteor_plugin.disabled():
                lengths, logits = _layer_lengths(model, batch)
                assert lengths == reference_lengths and torch.equal(logits, reference) and not meteor_plugin.is_enabled()
            assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 8)
        assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 4)
    assert REGISTRY.patched() == [] and not meteor_plugin.is_enabled() and not hasattr(model.config, "meteor")
    assert torch.equal(_layer_lengths(model, batch)[1], reference)
    with pytest.raises(KeyError):
        with meteor_plugin.enabled(STAGE3):
            assert REGISTRY.patched() != []
            raise KeyError("a user's error inside the block")
    assert REGISTRY.patched() == [] and not meteor_plugin.is_enabled()


def test_a_scope_inside_the_global_switch_gives_it_back_unchanged(tiny_llava):
    model = tiny_llava()
    batch = make_batch([(2, 3)], [True])
    meteor_plugin.enable(STAGE3)
    _layer_lengths(model, batch)  # a first forward patches the decoder layers' class too
    patched = REGISTRY.patched()
    with meteor_plugin.enabled(OTHER):
        assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 8)
    with meteor_plugin.disabled():
        assert _layer_lengths(model, batch)[0] == [_full(batch)] * len(model.get_model().layers)
    assert ACTIVE.enabled and ACTIVE.config is STAGE3 and REGISTRY.patched() == patched
    assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 4)
    assert model.config.meteor == STAGE3.to_dict()  # the switch's config in force, as enable() documents


def test_attach_prunes_that_model_only_and_detach_gives_everything_back(tiny_llava):
    pruned, other = tiny_llava(), tiny_llava(seed=3)  # the same class
    batch = make_batch([(2, 3)], [True])
    other_lengths, other_reference = _layer_lengths(other, batch)
    with meteor_plugin.attach(pruned, STAGE3) as attachment:
        assert attachment.config == STAGE3 and not meteor_plugin.is_enabled()
        assert _layer_lengths(pruned, batch)[0] == _pruned(pruned, batch, 4)
        lengths, logits = _layer_lengths(other, batch)
        assert lengths == other_lengths and torch.equal(logits, other_reference)
        assert pruned.config.meteor == STAGE3.to_dict() and not hasattr(other.config, "meteor")
        with meteor_plugin.disabled():  # switches attached models off too
            assert _layer_lengths(pruned, batch)[0] == [_full(batch)] * len(pruned.get_model().layers)
        with meteor_plugin.enabled(OTHER):  # an explicit config wins over the model's own
            assert _layer_lengths(pruned, batch)[0] == _pruned(pruned, batch, 8)
        meteor_plugin.attach(pruned, OTHER)  # attaching again changes the config
        assert _layer_lengths(pruned, batch)[0] == _pruned(pruned, batch, 8)
    assert REGISTRY.patched() == [] and not hasattr(pruned.config, "meteor")
    assert meteor_plugin.detach(pruned) is False


def test_attach_refuses_a_model_no_family_prunes_by_name():
    from tests.adapters.test_refusal import unsupported_vlm

    model = unsupported_vlm()
    with pytest.raises(meteor_plugin.UnsupportedModelError, match=type(model).__name__):
        meteor_plugin.attach(model, STAGE3)
    assert REGISTRY.patched() == [] and not hasattr(model.config, "meteor")


def test_a_thread_inside_enabled_and_one_outside_both_run_right(tiny_llava):
    model = tiny_llava()
    batch = make_batch([(2, 3), (3, 2)], [True, True])
    unpruned_lengths, unpruned = _layer_lengths(model, batch)
    with meteor_plugin.enabled(STAGE3):
        pruned_lengths, pruned = _layer_lengths(model, batch)
    assert pruned_lengths != unpruned_lengths
    results, errors = {}, []
    inside, outside = threading.Barrier(2), threading.Event()

    def in_scope():
        try:
            with meteor_plugin.enabled(STAGE3):
                inside.wait()
                results["inside"] = [_layer_lengths(model, batch) for _ in range(3)]
                outside.wait(timeout=60)  # the other thread finishes while this scope is still open
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def out_of_scope():
        try:
            inside.wait()
            results["outside"] = [_layer_lengths(model, batch) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            outside.set()

    threads = [threading.Thread(target=in_scope), threading.Thread(target=out_of_scope)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for lengths, logits in results["inside"]:
        assert lengths == pruned_lengths and torch.equal(logits, pruned)
    for lengths, logits in results["outside"]:
        assert lengths == unpruned_lengths and torch.equal(logits, unpruned)
    assert REGISTRY.patched() == []


def test_calibration_leaves_the_users_switch_and_config_as_they_were(tiny_llava, tmp_path):
    from meteor_plugin.calibrate import calibrate, pixels
    from meteor_plugin.fidelity import scene_images
    from meteor_plugin.testing.eagle_like import build_tiny_tokenizer

    model = tiny_llava()
    tokenizer = build_tiny_tokenizer()
    users = STAGE3.replace(llm_lambda=3.0)
    meteor_plugin.enable(users)
    batch = make_batch([(2, 3)], [True])
    _layer_lengths(model, batch)  # a first forward patches the decoder layers' class too
    patched = REGISTRY.patched()
    calibrate(model, pixels(model, scene_images(2)), MeteorConfig(), tokenizer, target_keep=0.25)
    assert ACTIVE.enabled and ACTIVE.config is users and model.config.meteor == users.to_dict()
    # Only block classes the calibration ran Stage 1 in were patched besides (at their first forward; inert
    # without a plan, and put back with the rest when the user's switch goes off).
    added = [(owner.__name__, name) for owner, name in REGISTRY.patched() if (owner, name) not in patched]
    assert added == [("CLIPEncoderLayer", "forward")]
    assert _layer_lengths(model, batch)[0] == _pruned(model, batch, 4)
