"""Stages 1 and 3 on a random Qwen2.5-VL-shaped model (transformers' ``Qwen2_5_VLForConditionalGeneration``):
prefill latency, FLOPs and memory, unpruned against pruned.

The CPU-sized model keeps Qwen2.5-VL's token geometry (14 px patches, 2x2 of them merged into one language-model
token, windows of 112 px, full attention in every fourth block of the tower) on one 448x672 image (32x48 patches,
384 visual tokens), with a narrower tower (width 256, 8 blocks) and language model (width 1024, 8 layers, grouped
KV heads). ``--shape qwen2.5-vl-7b`` runs the real 7B dimensions on a GPU. Pruned: Stage 1 keeps half of the
image's tokens inside the tower, Stage 3 keeps an eighth of them after ``llm_layer``. Both variants run on the
same model and inputs, interleaved, in one process; the FLOPs ratio is printed beside the measured speedup.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch

import meteor_plugin
from meteor_plugin.bench.compare import Variant, compare, cost_rows, runs_text, speed, speedup_line
from meteor_plugin.bench.machine import describe
from meteor_plugin.testing.qwen_vl import TinyQwenSpec, build_tiny_qwen_vl, qwen_batch


@dataclass
class QwenBench:
    encoder_keep: float = 0.5  # of the image's tokens, inside the tower
    llm_keep: Optional[int] = None  # visual tokens after llm_layer (None: an eighth of the image's tokens)
    llm_layer: int = 2
    grid: Tuple[int, int] = (32, 48)  # the image in patches (height, width): 448x672 px at 14 px
    text_before: int = 20  # the chat template's system prompt and user turn before the image
    text_after: int = 20  # the question and the assistant turn
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"


QWEN25_SCALED = TinyQwenSpec(
    kind="qwen2_5_vl", patch_size=14, vision_hidden=256, vision_layers=8, vision_heads=4, vision_intermediate=512,
    window_size=112, fullatt_blocks=(3, 7), llm_hidden=1024, llm_layers=8, llm_heads=16, llm_kv_heads=4,
    llm_intermediate=2816, vocab_size=32000, rope_theta=1000000.0, attn_implementation="sdpa")
QUICK = TinyQwenSpec(kind="qwen2_5_vl", patch_size=14, vision_hidden=32, vision_layers=4, vision_heads=2,
                     window_size=112, fullatt_blocks=(3,), llm_hidden=64, llm_layers=4, llm_heads=4, llm_kv_heads=2,
                     llm_intermediate=128, vocab_size=256)
QUICK_GRID = (16, 24)


def unavailable() -> Optional[str]:
    """Why this stack cannot run the bench (None where it can): the class it builds is pruned on transformers 5.x."""
    import transformers

    from meteor_plugin.compat.transformers import generation

    if generation() != "5":
        return f"the Qwen-VL classes are pruned on transformers 5.x only, and this is {transformers.__version__}"
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        return f"transformers {transformers.__version__} has no Qwen2_5_VLForConditionalGeneration"
    return None


def run(bench: Optional[QwenBench] = None, spec: TinyQwenSpec = QWEN25_SCALED) -> Dict[str, Any]:
    bench = bench or QwenBench()
    why = unavailable()
    if why is not None:
        raise ValueError(f"bench qwen-vl: {why}")
    device = torch.device(bench.device)
    dtype = getattr(torch, bench.dtype)
    model = build_tiny_qwen_vl(spec).to(device=device, dtype=dtype)
    if spec.vocab_size < 256:
        raise ValueError(f"the Qwen bench writes its placeholders as tokens 250-253: vocab_size={spec.vocab_size} "
                         "is too small")
    batch = qwen_batch(model, [[(bench.text_before, (1, *bench.grid))]], [bench.text_after], seed=0)
    batch = {k: v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device) for k, v in batch.items()}
    visual = int(batch["mm_token_type_ids"].sum())
    keep = bench.llm_keep if bench.llm_keep is not None else visual // 8
    if not 0 < keep <= visual:
        raise ValueError(f"llm_keep={keep} is invalid: allowed 1..{visual} (the image's tokens)")
    config = meteor_plugin.MeteorConfig(encoder=True, fusion=False, llm=True, encoder_keep=bench.encoder_keep,
                                        llm_layer=bench.llm_layer, llm_min_keep=keep, llm_max_keep=keep)

    def prefill():
        with torch.no_grad():
            return model(**batch, use_cache=True)

    def inspect(name):
        stats = meteor_plugin.stats(model)
        length = batch["input_ids"].shape[1]
        if stats is None or name == "unpruned":  # stats() holds the last pruned run's: not this one's
            return {"layer_tokens": [length] * spec.llm_layers, "encoder_tokens": visual, "visual_tokens": visual}
        s = stats.stages[0]
        return {"layer_tokens": list(stats.layer_seq_len), "encoder_tokens": s["encoder"].left,
                "visual_tokens": s["llm"].left}

    attachment = meteor_plugin.attach(model, config)  # this model prunes; "unpruned" runs it as it is
    variants = [Variant("unpruned", meteor_plugin.disabled), Variant("meteor", contextlib.nullcontext)]
    results = compare(prefill, variants, bench.repeats, bench.warmup, device, inspect=inspect,
                      llm=model.model.language_model)
    attachment.detach()
    return {
        "benchmark": "qwen-vl-prefill", "machine": describe(device), "dtype": bench.dtype, "model": asdict(spec),
        "settings": {**asdict(bench), "llm_keep": keep}, "sequence_length": batch["input_ids"].shape[1],
        "variants": results, **speed(results, "unpruned", "meteor", device),
    }


def report(result: Dict[str, Any]) -> str:
    m, s, v = result["model"], result["settings"], result["variants"]
    u, p = v["unpruned"], v["meteor"]
    h, w = s["grid"]
    patch = m["patch_size"]
    lines = [
        "Qwen2.5-VL-shaped random model (transformers' Qwen2_5_VLForConditionalGeneration), Stages 1 and 3, batch 1",
        f"  vision: one {h * patch}x{w * patch} px image, {patch} px patches merged {m['merge']}x{m['merge']} = "
        f"{u['encoder_tokens']} tokens; tower width {m['vision_hidden']}, {m['vision_layers']} blocks, windows of "
        f"{m['window_size']} px, full attention in blocks {', '.join(map(str, m['fullatt_blocks']))}",
        f"  LLM: width {m['llm_hidden']}, {m['llm_layers']} layers, {m['llm_heads']} heads ({m['llm_kv_heads']} KV), MLP "
        f"{m['llm_intermediate']}; prompt {s['text_before']} + image + {s['text_after']} tokens = "
        f"{result['sequence_length']}",
        f"  pruned: Stage 1 keeps {s['encoder_keep']:g} of the image's tokens inside the tower, Stage 3 keeps "
        f"{s['llm_keep']} after layer {s['llm_layer']}",
        f"  machine: {result['machine']}, {result['dtype']}; median of {s['repeats']} interleaved runs",
        "",
        f"  {'':26}{'unpruned':>16}{'METEOR':>16}",
        f"  {'tokens out of the tower':26}{u['encoder_tokens']:>16}{p['encoder_tokens']:>16}",
        f"  {'visual tokens at the end':26}{u['visual_tokens']:>16}{p['visual_tokens']:>16}",
        f"  {'tokens per LLM layer':26}{runs_text(u['layer_tokens']):>16}{runs_text(p['layer_tokens']):>16}",
        *cost_rows(u, p),
        "",
        speedup_line(result),
    ]
    return "\n".join(lines)
