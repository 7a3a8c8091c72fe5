"""EAGLE's per-encoder projectors before training, in one process: when ``before_training`` splits them,
when they train, and what it refuses. (The ZeRO-3 split runs under the launcher in test_eagle_training.py.)"""

import types

import pytest
import torch

import meteor_plugin
from meteor_plugin.adapters.eagle import convert_to_post_projection
from meteor_plugin.adapters.eagle import training as eagle_projectors
from meteor_plugin.adapters.eagle.training import before_training
from meteor_plugin.testing.workspace import EAGLE_TOWERS

ARGS = types.SimpleNamespace(output_dir="out")


@pytest.fixture
def eagle():
    from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle

    return lambda: build_tiny_eagle(TinyEagleSpec(vision_tower=EAGLE_TOWERS))


def _projectors(model):
    return getattr(model.get_model(), "mm_projectors", None)


def test_an_unconverted_model_is_split_before_training_as_the_conversion_does(eagle):
    model, reference = eagle(), eagle()
    convert_to_post_projection(reference)
    meteor_plugin.enable()
    before_training(model, ARGS)
    assert model.config.meteor_fusion == reference.config.meteor_fusion
    pairs = list(zip(_projectors(model).named_parameters(), _projectors(reference).named_parameters()))
    assert len(pairs) == 12
    for (name, ours), (_, theirs) in pairs:
        assert torch.equal(ours, theirs) and ours.requires_grad, name
    assert eagle_projectors.SPLIT_IN_TRAINING[model] == {"gathered": 0, "partitioned": 0, "created": 12}
    split = _projectors(model)
    before_training(model, ARGS)  # converted now: nothing is split again
    assert _projectors(model) is split


def test_the_projectors_train_exactly_when_upstream_trains_the_shared_one(eagle):
    model = eagle()
    shared = model.get_model().mm_projector
    shared.requires_grad_(False)  # --freeze_mm_mlp_adapter
    meteor_plugin.enable()
    before_training(model, ARGS)
    assert not any(p.requires_grad for p in _projectors(model).parameters())
    model.requires_grad_(False)
    shared.requires_grad_(True)  # --tune_mm_mlp_adapter (or LoRA, which re-enables the projector)
    before_training(model, ARGS)
    assert all(p.requires_grad for p in _projectors(model).parameters())


def test_training_free_and_meteor_off_keep_eagles_fusion_and_a_converted_model_refuses_meteor_off(eagle):
    model = eagle()
    meteor_plugin.enable(fusion_mode="training_free")
    before_training(model, ARGS)
    assert _projectors(model) is None
    meteor_plugin.disable()
    before_training(model, ARGS)
    assert _projectors(model) is None
    convert_to_post_projection(model)  # config.meteor_fusion: the saved model would claim projectors
    with pytest.raises(SystemExit, match="--meteor-off"):
        before_training(model, ARGS)
