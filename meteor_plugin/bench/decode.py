"""Batched generation with the KV cache on the LLaVA-1.5-shaped model: what a pruned prefill buys in decoding.

Stage 3 drops visual tokens from layer ``llm_layer`` on, so those layers' KV cache holds fewer tokens and
every decoding step attends over a shorter cache. This bench runs ``generate`` (greedy, a batch of prompts
of equal length, so no padding, ``max_new_tokens`` new tokens each, the cache on) unpruned and with Stage 3
on the same model and inputs, interleaved after a warm-up, and prints per variant: the generate time, the
new tokens per second, the decoding time alone (the same generate with one new token subtracted: the
prefill and the first token) and the KV cache's bytes at the end, read from the cache tensors themselves.
"""

from __future__ import annotations

import contextlib

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch

import meteor_plugin
from meteor_plugin.bench.llava_prefill import LLAVA15_SCALED, QUICK
from meteor_plugin.bench.machine import describe
from meteor_plugin.compat.transformers import cache_bytes
from meteor_plugin.progress import bar
from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava, make_batch

QUICK_DECODE = QUICK


@dataclass
class DecodeBench:
    batch: int = 8
    new_tokens: int = 64
    keep: int = 144  # visual tokens Stage 3 keeps: 25% of 576
    llm_layer: int = 2
    text_before: int = 35
    text_after: int = 20
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"


def run(bench: DecodeBench = DecodeBench(), spec: TinyLlavaSpec = LLAVA15_SCALED) -> Dict[str, Any]:
    device = torch.device(bench.device)
    model = build_tiny_llava(spec).to(device=device, dtype=getattr(torch, bench.dtype))
    model.generation_config.eos_token_id = None  # random weights: every row decodes all its tokens
    if not 0 < bench.keep <= spec.visual_tokens:
        raise ValueError(f"keep={bench.keep} is invalid: allowed 1..{spec.visual_tokens} (the visual tokens per image)")
    ids, mask, images = make_batch([(bench.text_before, bench.text_after)] * bench.batch, [True] * bench.batch,
                                   vocab_size=spec.vocab_size, image_size=spec.image_size, seed=0)
    ids, mask = ids.to(device), mask.to(device)
    images = images.to(device=device, dtype=getattr(torch, bench.dtype))
    config = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=True, llm_layer=bench.llm_layer,
                                        llm_min_keep=bench.keep, llm_max_keep=bench.keep)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def generate(steps: int):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, images=images, max_new_tokens=steps, do_sample=False,
                                  num_beams=1, use_cache=True, pad_token_id=0, return_dict_in_generate=True)

    def timed(steps: int) -> float:
        sync()
        start = time.perf_counter()
        generate(steps)
        sync()
        return time.perf_counter() - start

    # Unpruned runs with the plugin on and every stage off (its outputs equal the unpatched model's): upstream
    # LLaVA's own generate raises on transformers 4.38-4.44 (cache_position), the patched one does not.
    off = config.replace(llm=False)
    attachment = meteor_plugin.attach(model, off)  # the patches stay on through every round
    scopes = {"unpruned": contextlib.nullcontext, "stage3": lambda: meteor_plugin.enabled(config)}
    runs: Dict[str, Dict[str, List[float]]] = {name: {"full": [], "first": []} for name in scopes}
    with bar((bench.warmup + bench.repeats) * 2 * len(scopes), "generates", "run") as progress:
        for round_ in range(bench.warmup + bench.repeats):
            for name, scope in scopes.items():
                with scope():
                    full, first = timed(bench.new_tokens), timed(1)
                if round_ >= bench.warmup:
                    runs[name]["full"].append(full)
                    runs[name]["first"].append(first)
                progress.update(2)
    results: Dict[str, Dict[str, Any]] = {}
    for name, scope in scopes.items():
        with scope():
            out = generate(bench.new_tokens)
            kept = meteor_plugin.stats(model).stages[0]["llm"].left if name == "stage3" else spec.visual_tokens
        full = statistics.median(runs[name]["full"])
        decode = statistics.median(f - s for f, s in zip(runs[name]["full"], runs[name]["first"]))
        results[name] = {
            "generate_seconds": full,
            "tokens_per_second": bench.batch * bench.new_tokens / full,
            "decode_seconds": decode,
            "decode_tokens_per_second": bench.batch * (bench.new_tokens - 1) / decode,
            "kv_cache_mib": cache_bytes(out.past_key_values) / 2 ** 20,
            "visual_tokens": kept,
            "runs": runs[name],
        }
    attachment.detach()
    u, p = results["unpruned"], results["stage3"]
    return {
        "benchmark": "llava-decode",
        "machine": describe(device),
        "dtype": bench.dtype,
        "model": asdict(spec),
        "settings": asdict(bench),
        "prompt_tokens": ids.shape[1] - 1 + spec.visual_tokens,
        "variants": results,
        "generate_speedup": u["generate_seconds"] / p["generate_seconds"],
        "decode_speedup": u["decode_seconds"] / p["decode_seconds"],
        "kv_cache_ratio": u["kv_cache_mib"] / p["kv_cache_mib"],
    }


def report(result: Dict[str, Any]) -> str:
    m, s, v = result["model"], result["settings"], result["variants"]
    u, p = v["unpruned"], v["stage3"]
    rows = (("visual tokens", "visual_tokens", 0), ("generate (s)", "generate_seconds", 3),
            ("new tokens per second", "tokens_per_second", 1), ("decoding alone (s)", "decode_seconds", 3),
            ("decoding tokens per second", "decode_tokens_per_second", 1), ("KV cache at the end (MiB)", "kv_cache_mib", 1))
    return "\n".join([
        f"LLaVA-1.5-shaped random model, batched generate with the KV cache: batch {s['batch']}, "
        f"{s['new_tokens']} new tokens each, greedy",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_kv_heads']} KV heads; prompt "
        f"{result['prompt_tokens']} tokens ({u['visual_tokens']} visual); Stage 3 keeps {s['keep']} from layer "
        f"{s['llm_layer']} on",
        f"  machine: {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved rounds after "
        f"{s['warmup']} warm-up",
        "",
        f"  {'':30}{'unpruned':>14}{'Stage 3':>14}",
        *[f"  {label:30}{u[key]:>14.{digits}f}{p[key]:>14.{digits}f}" for label, key, digits in rows],
        "",
        f"  generate {result['generate_speedup']:.2f}x faster, decoding alone {result['decode_speedup']:.2f}x, "
        f"KV cache {result['kv_cache_ratio']:.2f}x smaller",
    ])
