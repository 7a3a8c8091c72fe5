"""QLoRA: the language model in 4 bits, every visual module and lm_head in full precision."""

import re

import pytest
import torch

from meteor_plugin.training import quant

from training_support import ENCODER_KEPT, transformers_major

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


def _converted_by_transformers(model, skip, monkeypatch):
    """The linear layers this transformers' own bitsandbytes code would quantise given ``skip`` (each
    generation matches differently: 4.37 substring, 4.44 ``key + "."`` inside the path, 5.x regex from the
    start or suffix)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if transformers_major() >= 5:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return [n for n in linears if should_convert_module(n, skip)]
    # 4.x matches inside _replace_with_bnb_linear; run it with stand-in bnb layers (no bitsandbytes needed).
    import types

    import transformers.integrations.bitsandbytes as hf_bnb

    class Linear8bitLt(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    monkeypatch.setattr(hf_bnb, "bnb", types.SimpleNamespace(nn=types.SimpleNamespace(Linear8bitLt=Linear8bitLt)),
                        raising=False)
    # 4.37 imports these only when bitsandbytes is installed
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    for name, value in (("nn", torch.nn), ("Conv1D", Conv1D), ("init_empty_weights", init_empty_weights)):
        if not hasattr(hf_bnb, name):
            monkeypatch.setattr(hf_bnb, name, value, raising=False)
    config = types.SimpleNamespace(quantization_method=lambda: "llm_int8", llm_int8_has_fp16_weight=False,
                                   llm_int8_threshold=6.0, llm_int8_skip_modules=skip)
    hf_bnb._replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    return [n for n, m in model.named_modules() if isinstance(m, Linear8bitLt)]


def test_skip_modules_keep_visual_modules_and_lm_head_under_this_transformers_matching(tiny_llava, monkeypatch):
    model = tiny_llava()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = _converted_by_transformers(model, quant.skip_modules(extra=["mm_projectors"]), monkeypatch)
    assert len(converted) == 4 * 7 and all(LLM_LINEAR.search(n) for n in converted), converted
    kept = set(linears) - set(converted)
    assert {n for n in kept if "vision_tower" in n} and {n for n in kept if "mm_projector" in n} and "lm_head" in kept


def test_upstreams_skip_list_protects_the_projector_on_4x_only(tiny_llava, monkeypatch):
    """Why skip_modules exists: ["mm_projector"] (LLaVA's and EAGLE's train.py) stops working on 5.x."""
    converted = _converted_by_transformers(tiny_llava(), ["mm_projector"], monkeypatch)
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
