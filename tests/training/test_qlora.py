"""QLoRA: the language model in 4 bits, every visual module and lm_head in full precision."""

import re

import pytest
import torch

from meteor_plugin.training import quant

from training_support import ENCODER_KEPT, converted_by_transformers, transformers_major

LLM_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def _needs_cpu_bitsandbytes():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed in this stack (.ci/stacks/llava.txt and "
                        "eagle.txt leave it out; 4.37.2 could not quantise on CPU anyway: 'No GPU found. A GPU is "
                        "needed for quantization'); the current stack runs QLoRA")
    import transformers

    if transformers.__version__.startswith("4.37."):
        pytest.skip("transformers 4.37 cannot quantise with bitsandbytes on CPU ('No GPU found. A GPU is needed for "
                    "quantization'); the current stack runs QLoRA")


def test_a_4bit_qlora_run_trains_with_pruning_and_quantises_only_the_llm(workspace):
    _needs_cpu_bitsandbytes()
    run = workspace.qlora().require_success()
    quantized = run.probe["quantized"]
    assert len(quantized) == 4 * 7 and all(LLM_LINEAR.search(n) for n in quantized), quantized
    assert not [n for n in quantized if "vision_tower" in n or "mm_projector" in n or n.endswith("lm_head")]
    assert run.probe["engine"] == "DeepSpeedEngine"
    steps = [e for e in run.log_history() if "loss" in e]
    assert steps and all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    assert all(e["meteor/encoder_tokens_kept"] == ENCODER_KEPT for e in steps)
    assert all(LLM_LINEAR.search(n) for n in run.probe["adapted"])


def test_skip_modules_keep_visual_modules_and_lm_head_under_this_transformers_matching(tiny_llava, monkeypatch):
    model = tiny_llava()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = converted_by_transformers(model, quant.skip_modules(extra=["mm_projectors"]), monkeypatch)
    assert len(converted) == 4 * 7 and all(LLM_LINEAR.search(n) for n in converted), converted
    kept = set(linears) - set(converted)
    assert {n for n in kept if "vision_tower" in n} and {n for n in kept if "mm_projector" in n} and "lm_head" in kept


def test_upstreams_skip_list_protects_the_projector_on_4x_only(tiny_llava, monkeypatch):
    """Why skip_modules exists: ["mm_projector"] (LLaVA's and EAGLE's train.py) stops working on 5.x."""
    converted = converted_by_transformers(tiny_llava(), ["mm_projector"], monkeypatch)
    assert ("model.mm_projector.0" in converted) == (transformers_major() >= 5)


def test_upstream_bits_kwargs_are_made_valid():
    class Config:
        load_in_4bit, load_in_8bit, llm_int8_skip_modules = True, False, ["mm_projector"]

    config = Config()
    kwargs = quant.fix_from_pretrained_kwargs(
        {"load_in_4bit": True, "load_in_8bit": False, "quantization_config": config, "device_map": {"": "cpu"}})
    assert kwargs == {"quantization_config": config, "device_map": {"": "cpu"}}
    assert "lm_head" in config.llm_int8_skip_modules and "vision_tower" in config.llm_int8_skip_modules
    assert quant.fix_from_pretrained_kwargs({"torch_dtype": None}) == {"torch_dtype": None}
    with pytest.raises(ValueError, match="load_in_8bit=True was passed"):
        quant.fix_from_pretrained_kwargs({"load_in_8bit": True, "quantization_config": Config()})


def _converted_tiny_eagle():
    from meteor_plugin.adapters.eagle import convert_to_post_projection
    from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle
    from meteor_plugin.testing.workspace import EAGLE_TOWERS

    model = build_tiny_eagle(TinyEagleSpec(vision_tower=EAGLE_TOWERS))
    convert_to_post_projection(model)
    return model


def test_eagles_skip_list_keeps_towers_per_encoder_projectors_and_lm_head_under_this_transformers(monkeypatch):
    from meteor_plugin.adapters.eagle import TRAINING as EAGLE

    # EAGLE builds its towers inside from_pretrained: they, every projector and lm_head must be skipped.
    converted = converted_by_transformers(_converted_tiny_eagle(), quant.skip_modules(EAGLE.keep_unquantised),
                                          monkeypatch)
    assert len(converted) == 4 * 7 and all(LLM_LINEAR.search(n) for n in converted), converted
    # Why EAGLE lists "mm_projectors": transformers 4.44 (EAGLE's pin) skips a module only if "<name>." is in
    # its path, and "mm_projector." is not in "model.mm_projectors.0.0".
    plain = converted_by_transformers(_converted_tiny_eagle(), quant.skip_modules(), monkeypatch)
    import transformers

    assert any("mm_projectors" in n for n in plain) == transformers.__version__.startswith("4.44.")


def test_a_4bit_eagle_step_trains_adapters_and_per_encoder_projectors_with_stages_on(tmp_path):
    """What train.py --bits 4 --lora_enable does to a converted EAGLE checkpoint, in one process."""
    _needs_cpu_bitsandbytes()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    import meteor_plugin
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM
    from meteor_plugin.testing.llava import make_batch
    from meteor_plugin.training import hooks, lora
    from meteor_plugin.adapters.eagle import TRAINING as EAGLE

    folder = str(tmp_path / "tiny-eagle-meteor")
    _converted_tiny_eagle().save_pretrained(folder)
    meteor_plugin.enable(encoder_keep=96, fusion_keep=32, llm_max_keep=8, llm_min_keep=2,
                         encoder_ranks={"clip-448": 1.0, "convnext-1024": 2.0, "pix2struct-1024": 1.0})
    # upstream's kwargs (refused as they are by 4.44 and 5.x), through the entry's loader
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["mm_projector"],
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    model = hooks.QuantizationSafeLoader(EagleLlamaForCausalLM, EAGLE.keep_unquantised).from_pretrained(
        folder, load_in_4bit=True, load_in_8bit=False, quantization_config=config, device_map={"": "cpu"})
    quantized = quant.check_quantization(model)  # raises if a tower, projector or lm_head was quantised
    assert len(quantized) == 4 * 7 and all(LLM_LINEAR.search(n) for n in quantized)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora.target_regex(model)))
    lora.check_placement(model)
    lora.train_fully(model, EAGLE.fully_trained)
    model.train()
    ids, mask, images = make_batch([(3, 5), (2, 9)], [True, True], pad_side="right", image_size=128, seed=0)
    out = model(input_ids=ids, attention_mask=mask, images=images, labels=ids.masked_fill(ids < 0, -100))
    out.loss.backward()
    stages = meteor_plugin.stats(model).stages
    assert [(s["encoder"].left, s["fusion"].left) for s in stages] == [(96, 32), (96, 32)]
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "mm_projectors" in n)
