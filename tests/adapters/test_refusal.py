"""While enabled, a vision-language model the plugin does not prune is refused at its first forward, by
name; text-only and contrastive models run as they do without the plugin."""

import pytest
import torch

import meteor_plugin
from meteor_plugin import UnsupportedModelError

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)


def unsupported_vlm():
    """A transformers vision-language model without an adapter on this stack: LLaVA-NeXT-Video on 5.x,
    VipLLaVA on 4.x (which has no LLaVA-NeXT-Video on 4.37)."""
    import transformers

    from meteor_plugin.compat.transformers import generation

    name = "LlavaNextVideo" if generation() == "5" else "VipLlava"
    config_cls = getattr(transformers, name + "Config")
    model_cls = getattr(transformers, name + "ForConditionalGeneration")
    torch.manual_seed(0)
    config = config_cls(vision_config=dict(model_type="clip_vision_model", **TINY_CLIP),
                        text_config=dict(model_type="llama", **TINY_LLAMA), image_token_index=63)
    return model_cls(config).eval()


def llava_mpt():
    from llava.model.language_model.llava_mpt import LlavaMptConfig, LlavaMptForCausalLM

    model = LlavaMptForCausalLM(LlavaMptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=64))
    model.config.mm_vision_tower = "openai/clip-vit-large-patch14-336"  # as its checkpoints' config.json says
    return model.eval()


def test_a_vision_language_model_without_an_adapter_is_refused_by_name_and_runs_after_disable():
    model = unsupported_vlm()
    ids = torch.tensor([[1, 5, 7, 9]])  # text only: the refusal is about the class, before any image
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    meteor_plugin.enable()
    with pytest.raises(UnsupportedModelError) as info:
        model(input_ids=ids)
    message = str(info.value)
    assert f"{type(model).__module__}.{type(model).__name__}" in message
    assert "LlavaLlamaForCausalLM" in message and "LlavaMistralForCausalLM" in message  # what is pruned
    with pytest.raises(UnsupportedModelError):  # generate goes through the same call
        model.generate(input_ids=ids, max_new_tokens=1)
    meteor_plugin.disable()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


def test_llava_mpt_is_refused_with_its_reason():
    model = llava_mpt()
    meteor_plugin.enable()
    with pytest.raises(UnsupportedModelError, match=r"LlavaMptForCausalLM: its upstream forward does not run"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_text_only_and_contrastive_models_run_unchanged_while_enabled():
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2),
                                vision_config=TINY_CLIP, projection_dim=16)).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        text_ref = llama(input_ids=ids).logits
        clip_ref = clip(input_ids=ids, pixel_values=pixels).logits_per_image
    meteor_plugin.enable()
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids).logits, text_ref)
        assert torch.equal(clip(input_ids=ids, pixel_values=pixels).logits_per_image, clip_ref)


def test_the_check_is_removed_by_disable():
    from transformers import PreTrainedModel

    owned = "__call__" in PreTrainedModel.__dict__
    meteor_plugin.enable()
    assert "__call__" in PreTrainedModel.__dict__
    meteor_plugin.disable()
    assert ("__call__" in PreTrainedModel.__dict__) == owned


def test_a_family_left_out_of_enable_is_refused_rather_than_run_unpruned(tiny_llava):
    from meteor_plugin.testing.eagle_like import install
    from meteor_plugin.testing.llava import make_batch

    install()

    model = tiny_llava()
    ids, mask, images = make_batch([(2, 3)], [True])
    meteor_plugin.enable(targets=["eagle"])
    with pytest.raises(UnsupportedModelError, match=r"LlavaLlamaForCausalLM: .*Pruned now: EagleLlamaForCausalLM"):
        model(input_ids=ids, attention_mask=mask, images=images)
