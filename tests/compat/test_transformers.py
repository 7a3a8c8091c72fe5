"""compat/transformers.py: what differs between transformers 4.37, 4.44 and 5.x, read in one place."""

import pytest
import torch

from meteor_plugin.compat import transformers as compat


@pytest.mark.parametrize("version,ok", [("4.37.2", True), ("4.44.2", True), ("5.0.0", True), ("5.23.0", True),
                                        ("5.24.0", False), ("4.36.2", False), ("4.45.0", False), ("5.23.0.dev0", True)])
def test_supported_version_ranges(version, ok):
    assert compat.is_supported(compat._parse(version)) is ok


def test_the_generation_follows_the_installed_version(monkeypatch):
    import transformers

    for version, generation in (("4.37.2", "4.37"), ("4.44.2", "4.44"), ("5.23.0", "5")):
        monkeypatch.setattr(transformers, "__version__", version)
        assert compat.generation() == generation


def test_clip_layers_are_found_in_either_generations_layout():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=16, patch_size=8))
    layers = compat.clip_layers(model)
    assert len(layers) == 3 and all(hasattr(layer, "layer_norm1") for layer in layers)
    inner = getattr(model, "vision_model", None)  # 4.x: the blocks are one level down
    assert (inner is None) == (compat.generation() == "5")
    if inner is not None:
        assert compat.clip_layers(inner) is layers


def test_a_cache_object_carries_a_mark_and_a_legacy_tuple_cache_none():
    class Cache:
        pass

    cache, legacy = Cache(), ((torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)),)
    assert not compat.cache_marked(cache, "mark")
    compat.mark_cache(cache, "mark")
    compat.mark_cache(legacy, "mark")
    compat.mark_cache(None, "mark")
    assert compat.cache_marked(cache, "mark") and not compat.cache_marked(legacy, "mark")
    assert compat.past_length(legacy, 0) == 2 and compat.past_length(None, 0) == 0


@pytest.mark.parametrize("impl,kind", [("eager", compat.MASK_ADDITIVE), ("sdpa", compat.MASK_BOOL),
                                       ("flash_attention_2", compat.MASK_2D)])
def test_the_mask_format_follows_the_attention_implementation(impl, kind):
    class Config:
        _attn_implementation = impl

    assert compat.mask_kind(Config(), None) == kind
    assert compat.mask_kind(Config(), torch.ones(1, 3)) == compat.MASK_2D  # an incoming mask's own format wins
