"""``meteor-plugin bench llava --tp N``: Stage 3's prefill, unpruned against pruned, on transformers'
``LlavaForConditionalGeneration`` loaded tensor-parallel over N ranks (``from_pretrained(..., distributed_config=
DistributedConfig(tp_plan="auto"))`` under torchrun), the way a checkpoint too big for one GPU runs.

The command relaunches itself under ``torch.distributed.run`` with N processes unless it is one of them already.
Rank 0 builds the random LLaVA-1.5-shaped model of ``bench llava`` (transformers' class) and saves it; every rank
loads it tensor-parallel. Each timed prefill starts after a barrier and counts until the slowest rank is done (the
maximum of the ranks' times), the two variants interleaved. Reported beside the times: the tokens each decoder layer
ran on, whether every rank kept the same visual tokens, and the FLOPs each rank counted on its own shards.

On a CPU the ranks share the machine's cores and exchange activations through gloo: a functional check whose times
mean little. The ratio means something on GPUs (NCCL, one rank per GPU).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch

import meteor_plugin
from meteor_plugin.bench.compare import runs_text
from meteor_plugin.flops import count_flops
from meteor_plugin.bench.machine import describe
from meteor_plugin.testing.llava import HF_IMAGE_TOKEN, TinyLlavaSpec, build_tiny_hf_llava, hf_batch


@dataclass
class TensorParallelBench:
    ranks: int = 2
    keep: int = 144  # visual tokens kept by Stage 3: 25% of 576
    llm_layer: int = 2
    text_before: int = 35
    text_after: int = 20
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"


def launch(ranks: int, argv: List[str]) -> int:
    """Run ``meteor-plugin <argv>`` on ``ranks`` processes under torch.distributed.run; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "meteor_plugin.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(command, env=env)


def is_rank() -> bool:
    """Whether this process is one of a torch.distributed launch's ranks."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _start(bench: TensorParallelBench) -> torch.device:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world != bench.ranks:
        raise ValueError(f"--tp {bench.ranks} runs on {bench.ranks} ranks, but this launch has {world}")
    device = torch.device(bench.device)
    if device.type == "cpu" and torch.cuda.is_available():
        raise ValueError("--tp on a machine with CUDA: transformers puts a tensor-parallel model on the GPUs, so run "
                         "it with --device cuda (one rank per GPU)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _load(spec: TinyLlavaSpec, dtype: torch.dtype, device: torch.device) -> Any:
    """The random model, built and saved by rank 0, loaded tensor-parallel by every rank."""
    import torch.distributed as dist
    import transformers
    from transformers.distributed import DistributedConfig

    folder = [tempfile.mkdtemp(prefix="meteor-tp-bench-") if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        build_tiny_hf_llava(spec).save_pretrained(folder[0])
    dist.broadcast_object_list(folder, src=0)
    dist.barrier()
    try:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            folder[0], dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder[0], ignore_errors=True)
    return model.to(device).eval()


def run(bench: TensorParallelBench, spec: TinyLlavaSpec) -> Dict[str, Any]:
    """On every rank: the bench's result (the same dict on each)."""
    import torch.distributed as dist

    if spec.llm_heads % bench.ranks or spec.llm_kv_heads % bench.ranks:
        raise ValueError(f"--tp {bench.ranks} does not divide the language model's {spec.llm_heads} attention heads "
                         f"({spec.llm_kv_heads} key heads) evenly across the ranks")
    if not 0 < bench.keep <= spec.visual_tokens:
        raise ValueError(f"keep={bench.keep} is invalid: allowed 1..{spec.visual_tokens} (the visual tokens per image)")
    device = _start(bench)
    model = _load(spec, getattr(torch, bench.dtype), device)
    ids, mask, pixels = hf_batch([(bench.text_before, bench.text_after)], visual_tokens=spec.visual_tokens,
                                 image_size=spec.image_size, seed=0)
    if HF_IMAGE_TOKEN >= spec.vocab_size:
        raise ValueError(f"the bench's image token {HF_IMAGE_TOKEN} lies outside the vocabulary of {spec.vocab_size}")
    ids, mask, pixels = ids.to(device), mask.to(device), pixels.to(device=device, dtype=getattr(torch, bench.dtype))
    config = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=bench.llm_layer,
                                        llm_min_keep=bench.keep, llm_max_keep=bench.keep)
    attachment = meteor_plugin.attach(model, config)  # this model prunes; "unpruned" runs it as it is
    switch = {"unpruned": meteor_plugin.disabled, "stage3": contextlib.nullcontext}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)

    def timed(name: str) -> float:
        with switch[name]():
            sync()
            dist.barrier()
            start = time.perf_counter()
            prefill()
            sync()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the prefill ends when its slowest rank does
        return float(elapsed)

    runs: Dict[str, List[float]] = {name: [] for name in switch}
    for round_ in range(bench.warmup + bench.repeats):
        for name in switch:
            seconds = timed(name)
            if round_ >= bench.warmup:
                runs[name].append(seconds)
    variants: Dict[str, Dict[str, Any]] = {}
    for name in switch:
        with switch[name]():
            prefill()
            stats = meteor_plugin.stats(model)
            flops = count_flops(prefill)
        kept = stats.stages[0]["llm"].detail["kept"] if stats is not None else None
        every = [None] * bench.ranks
        dist.all_gather_object(every, kept)
        full = int(mask.sum())  # one image token per visual token in transformers' prompts
        variants[name] = {
            "seconds": statistics.median(runs[name]), "runs": runs[name],
            "layer_tokens": list(stats.layer_seq_len) if stats is not None else [full] * spec.llm_layers,
            "visual_tokens": stats.stages[0]["llm"].left if stats is not None else spec.visual_tokens,
            "ranks_agree": all(k == every[0] for k in every),
            "gflops_per_rank": flops / 1e9,
        }
    attachment.detach()
    return {
        "benchmark": "llava-stage3-prefill-tensor-parallel",
        "machine": describe(device),
        "backend": dist.get_backend(),
        "dtype": bench.dtype,
        "model": asdict(spec),
        "settings": asdict(bench),
        "sequence_length": int(mask.sum()),
        "variants": variants,
        "speedup": variants["unpruned"]["seconds"] / variants["stage3"]["seconds"],
        "flops_ratio": variants["unpruned"]["gflops_per_rank"] / variants["stage3"]["gflops_per_rank"],
    }


def report(result: Dict[str, Any]) -> str:
    m, s, v = result["model"], result["settings"], result["variants"]
    u, p = v["unpruned"], v["stage3"]
    yes = {True: "yes", False: "NO"}
    lines = [
        f"LLaVA-1.5-shaped random model (transformers' LlavaForConditionalGeneration), Stage 3, batch 1, "
        f"tensor-parallel over {s['ranks']} ranks (tp_plan='auto', {result['backend']})",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_heads']} heads "
        f"({m['llm_heads'] // s['ranks']} per rank), MLP {m['llm_intermediate']}; "
        f"{u['visual_tokens']} visual tokens, sequence {result['sequence_length']}",
        f"  machine (per rank): {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved runs, "
        "each timed until its slowest rank is done",
        "",
        f"  {'':30}{'unpruned':>14}{'Stage 3':>14}",
        f"  {'visual tokens':30}{u['visual_tokens']:>14}{p['visual_tokens']:>14}",
        f"  {'tokens per LLM layer':30}{runs_text(u['layer_tokens']):>14}{runs_text(p['layer_tokens']):>14}",
        f"  {'every rank kept the same':30}{yes[u['ranks_agree']]:>14}{yes[p['ranks_agree']]:>14}",
        f"  {'prefill latency (s)':30}{u['seconds']:>14.3f}{p['seconds']:>14.3f}",
        f"  {'GFLOPs per rank (counted)':30}{u['gflops_per_rank']:>14.2f}{p['gflops_per_rank']:>14.2f}",
        "",
        f"  pruned/unpruned prefill time {1 / result['speedup']:.2f} (speedup {result['speedup']:.2f}x), "
        f"FLOPs ratio per rank {result['flops_ratio']:.2f}x",
    ]
    if result["backend"] == "gloo":
        lines.append("  (gloo on a CPU: the ranks share its cores, so the times check that it runs, not its speed)")
    return "\n".join(lines)
