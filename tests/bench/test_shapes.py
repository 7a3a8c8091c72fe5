"""The full-size GPU shapes: each builder runs here at a scaled-down size, and a device too small is refused."""

import pytest
import torch

from meteor_plugin.bench import eagle_prefill, llava_next_prefill, llava_prefill, qwen_vl_prefill, shapes
from meteor_plugin.cli import main

EXPECTED = {  # visual tokens unpruned -> pruned, as each bench prunes them at full size
    "llava-1.5-7b": (576, 144),
    "llava-next-7b": (2880, 360),
    "eagle-x4-7b": (1024, 242),
    "qwen2.5-vl-7b": (384, 48),
}
LLM_DIMS = {"qwen2.5-vl-7b": (3584, 28, 28, 18944)}  # Qwen2.5-7B; the others are Vicuna-7B's


@pytest.mark.parametrize("name", list(shapes.SHAPES))
def test_every_full_size_builder_runs_scaled_down_with_the_real_token_geometry(name):
    which, spec = shapes.shape(name)
    dims = LLM_DIMS.get(name, (4096, 32, 32, 11008))
    assert (spec.llm_hidden, spec.llm_layers, spec.llm_heads, spec.llm_intermediate) == dims
    small = shapes.scaled(spec, width=32, depth=8)
    assert small.llm_hidden == 128 and small.llm_layers == 4  # one head of 128 channels (Vicuna's and Qwen's)
    if which == "qwen-vl":
        if qwen_vl_prefill.unavailable() is not None:
            pytest.skip(qwen_vl_prefill.unavailable())
        result = qwen_vl_prefill.run(qwen_vl_prefill.QwenBench(repeats=1, warmup=0), small)
        got = (result["variants"]["unpruned"]["visual_tokens"], result["variants"]["meteor"]["visual_tokens"])
        assert result["variants"]["meteor"]["encoder_tokens"] == 192  # half of them kept inside the tower
    elif which == "llava":
        result = llava_prefill.run(llava_prefill.PrefillBench(repeats=1, warmup=0), small)
        got = (result["variants"]["unpruned"]["visual_tokens"], result["variants"]["stage3"]["visual_tokens"])
    elif which == "llava-next":
        result = llava_next_prefill.run(llava_next_prefill.NextBench(repeats=1, warmup=0), small)
        got = (result["variants"]["unpruned"]["visual_tokens"], result["variants"]["meteor"]["visual_tokens"])
    else:
        from meteor_plugin.testing.eagle_like import install

        install()
        result = eagle_prefill.run(eagle_prefill.EagleBench(repeats=1, warmup=0), small)
        stages = result["variants"]["meteor"]["stages"]
        assert stages["encoders"] == 576 + 3 * 1024  # CLIP at 336 px, the others on EAGLE's 32x32 grid at 1024 px
        got = (result["variants"]["unpruned"]["stages"]["llm input"], stages["after stage 3"])
    assert got == EXPECTED[name]
    assert result["flops_ratio"] > 1


def test_parameter_estimates_match_the_7b_models():
    assert 6.9e9 < shapes.parameters(shapes.shape("llava-1.5-7b")[1]) < 7.2e9  # Vicuna-7B 6.74B + CLIP-L 0.30B
    assert 8.0e9 < shapes.parameters(shapes.shape("eagle-x4-7b")[1]) < 9.0e9  # + ConvNeXt-XXL, SAM-L, Pix2Struct-L
    assert 8.2e9 < shapes.parameters(shapes.shape("qwen2.5-vl-7b")[1]) < 8.4e9  # Qwen2.5-VL-7B: 8.29B


def test_a_device_without_room_is_refused_before_anything_is_built(monkeypatch, capsys):
    monkeypatch.setattr(shapes, "_available", lambda device: (8 * 2 ** 30, 64 * 2 ** 30))
    with pytest.raises(MemoryError, match=r"--shape llava-1.5-7b needs about 20 GiB on cuda:0 \(7.0B parameters in "
                                          r"bfloat16.*but 8 GiB and 64 GiB are free"):
        shapes.check_memory("llava-1.5-7b", shapes.shape("llava-1.5-7b")[1], torch.device("cuda:0"), torch.bfloat16)
    assert shapes.check_memory("llava-1.5-7b", shapes.scaled(shapes.shape("llava-1.5-7b")[1], 32, 8),
                               torch.device("cpu"), torch.float32) < 1e8
    # The command says it as a usage error, and a shape asked of another bench names the right one.
    assert main(["bench", "llava", "--shape", "llava-1.5-7b"]) == 2
    assert "--shape llava-1.5-7b needs about 39 GiB on cpu" in capsys.readouterr().err
    assert main(["bench", "eagle", "--shape", "llava-1.5-7b"]) == 2
    assert "is a shape of the 'llava' bench" in capsys.readouterr().err
    assert shapes.attention_for(torch.device("cpu")) == "sdpa"
