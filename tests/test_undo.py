"""Exact undo (issue 12, item 5): ``disable()`` gives every model back its ``config.meteor`` as it found it
and forgets the stats of every run."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.testing.llava import make_batch

ALL_LLAVA = dict(encoder=True, fusion=False, llm=True, encoder_keep=0.5, llm_min_keep=4, llm_max_keep=12)


def _logits(model, ids, mask, images):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images).logits


def test_disable_removes_the_config_enable_wrote_and_forgets_stats(tiny_llava):
    model = tiny_llava()
    assert not hasattr(model.config, "meteor")
    meteor_plugin.enable(**ALL_LLAVA)
    _logits(model, *make_batch([(2, 3)], [True]))
    assert model.config.meteor == meteor_plugin.MeteorConfig(**ALL_LLAVA).to_dict()
    assert meteor_plugin.stats(model) is not None
    meteor_plugin.disable()
    assert not hasattr(model.config, "meteor")
    assert "meteor" not in model.config.to_dict()
    assert meteor_plugin.stats(model) is None


@pytest.mark.parametrize("when", ["before_enable", "while_enabled"])
def test_disable_keeps_a_config_the_user_attached(tiny_llava, when):
    model = tiny_llava()
    own = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_max_keep=7)
    if when == "before_enable":
        meteor_plugin.attach(model, own)
    meteor_plugin.enable(llm_layer=1)
    _logits(model, *make_batch([(2, 3)], [True]))
    if when == "while_enabled":
        meteor_plugin.attach(model, own)
        _logits(model, *make_batch([(2, 3)], [True]))
        assert model.config.meteor == own.replace(llm_layer=1).to_dict()
    meteor_plugin.disable()
    assert model.config.meteor == own.to_dict()


def test_disable_keeps_the_checkpoint_config(tiny_llava, tmp_path):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = tiny_llava()
    saved = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm_max_keep=9)
    meteor_plugin.attach(model, saved)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    reloaded.get_vision_tower().load_model()
    meteor_plugin.enable(llm_min_keep=2)
    _logits(reloaded, *make_batch([(2, 3)], [True]))
    assert reloaded.config.meteor == saved.replace(llm_min_keep=2).to_dict()
    meteor_plugin.disable()
    assert reloaded.config.meteor == saved.to_dict()


