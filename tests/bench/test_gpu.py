"""``meteor-plugin bench gpu`` refuses without a GPU, and its pieces run on a CPU at scaled-down shapes (a dry run: CI
never has a GPU, so this is what checks the script before one is lent)."""

import pytest
import torch

from meteor_plugin.bench import gpu
from meteor_plugin.bench.qwen_vl_prefill import unavailable
from meteor_plugin.cli import main

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")


@no_gpu
def test_it_refuses_cleanly_without_a_gpu(capsys):
    assert main(["bench", "gpu"]) == 2
    assert "bench gpu needs a CUDA GPU and none is visible here" in capsys.readouterr().err
    assert main(["bench", "gpu", "--device", "cpu"]) == 2
    assert "--device cpu is not one" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        gpu.run(gpu.GpuBench())  # the library call refuses alike, before building anything


def test_a_dry_run_on_the_cpu_checks_the_key_column_and_fills_the_table():
    if gpu.unsupported_stack() is not None:  # transformers 4.x: refused by name before anything is built
        with pytest.raises(ValueError, match="runs on transformers 5.x"):
            gpu.run(gpu.GpuBench(device="cpu", scale=(16, 8)))
        return
    result = gpu.run(gpu.GpuBench(device="cpu", dtype="bfloat16", repeats=1, scale=(16, 8),
                                  shapes=["llava-1.5-7b", "qwen2.5-vl-7b"]))
    ex = result["exactness"]
    assert ex["head_dim"] == 128 and ex["passes"] and not ex["flash_attention_2"]  # no flash_attn on a CPU
    assert [(r["dtype"], r["path"]) for r in ex["rows"]] == [("float32", "key column, sdpa"),
                                                             ("bfloat16", "key column, sdpa")]
    f32, bf16 = ex["rows"]
    assert f32["prefill"] < 1e-4 and f32["decode"] < 1e-4 and f32["floor"] is None
    assert bf16["floor"]["prefill"] > 0 and bf16["tokens_equal"] and bf16["same_selection"]
    llava, qwen = result["shapes"]
    assert llava["attention"] == "sdpa" and llava["tokens"] == ([631] * 4, [631] * 2 + [199] * 2)
    assert llava["gflops"][0] > llava["gflops"][1] > 0 and llava["target"] == 0.9 and len(llava["round_speedups"]) == 1
    text = gpu.report(result)
    assert "key column against the float mask" in text and "a dry run" in text and "llava-1.5-7b" in text
    if unavailable() is None:
        assert qwen["bench"] == "qwen-vl" and qwen["gflops"][0] > qwen["gflops"][1] > 0  # Stages 1 and 3, Qwen2.5-VL
        assert qwen["tokens"][1][-1] < qwen["tokens"][0][-1] and "skipped" not in text
    else:  # a 5.x without Qwen2.5-VL: the shape is skipped by name
        assert qwen["skipped"] == unavailable() and "qwen2.5-vl-7b  skipped" in text
