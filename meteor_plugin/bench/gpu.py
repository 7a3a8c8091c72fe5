"""``meteor-plugin bench gpu``: the full-size shapes on a GPU, in one prepared run that prints one table.

1. **The key column's exactness on this GPU.** A LLaVA-1.5-shaped model with the real head width (Vicuna's 128
   channels; the other widths and depths of ``shapes.scaled(width=4, depth=8)``), a left-padded batch of two,
   Stages 1 and 3 with proportional attention, the prefill and 3 cached decoding steps: through the key column
   under SDPA (float32 and ``dtype``) and FlashAttention-2 (``dtype``, where ``flash_attn`` is installed), against
   the additive float mask under SDPA in the same precision: within 1e-3 in float32, and in ``dtype`` within twice
   the gap between SDPA and eager running the same float mask (``dtype``'s own rounding) plus 1e-3, with the same
   greedy tokens and the same tokens kept by Stage 3.
2. **Speed per shape** (``shapes.SHAPES``: ``llava-1.5-7b``, ``llava-next-7b``, ``eagle-x4-7b``; a shape this
   version does not have, e.g. ``qwen2.5-vl-7b``, is skipped by name): the memory check, then that shape's
   prefill bench (unpruned against pruned, interleaved, needed FLOPs, each round's speedup, the 95% target) in
   ``dtype`` with FlashAttention-2 where installed (SDPA otherwise, said in the table); a shape the GPU cannot
   hold is skipped with the numbers.

Without a CUDA GPU it refuses before building anything. ``device="cpu"`` runs the same pieces (tests do, at
``scale``d shapes) to check them where no GPU is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

SHAPES = ("llava-1.5-7b", "llava-next-7b", "eagle-x4-7b", "qwen2.5-vl-7b")


@dataclass
class GpuBench:
    shapes: Sequence[str] = SHAPES
    device: str = "cuda"
    dtype: str = "bfloat16"
    repeats: int = 5
    warmup: int = 1
    scale: Optional[Tuple[int, int]] = None  # (width, depth) divisors of every shape: dry runs on a CPU
    exactness: bool = True


def require_gpu(device: str) -> torch.device:
    """The CUDA device to run on, or a ValueError naming why not (no GPU visible, or a non-CUDA device)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"bench gpu runs on a CUDA device; --device {device} is not one")
    if not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
                         "on this machine run the CPU benches: meteor-plugin bench all --llm-layers 32")
    return dev


def attention_implementation(device: torch.device) -> str:
    from .shapes import attention_for

    return attention_for(device)


# Exactness --------------------------------------------------------------------------------------------------
def _exactness_spec(scale: Optional[Tuple[int, int]]):
    from ..testing.llava import TinyLlavaSpec
    from .shapes import CLIP_L_336, VICUNA_7B, scaled

    width, depth = scale or (4, 8)
    return scaled(TinyLlavaSpec(**CLIP_L_336, **VICUNA_7B), width, depth)


def _run_llava(model: Any, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, steps: int):
    """(prefill logits at the real positions, per-step logits, generated tokens, Stage 3's kept tokens) of one
    pruned call."""
    import meteor_plugin

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=images).logits
        run = meteor_plugin.stats(model)
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=steps, do_sample=False,
                             num_beams=1, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    real = torch.cat([row[-n:] for row, n in zip(logits, run.layer_tokens[-1])]).float()
    kept = [sample["llm"].detail["kept"] for sample in run.stages]
    return real, torch.stack(list(out.logits)).float(), out.sequences[:, -steps:], kept


def exactness(device: torch.device, dtype: torch.dtype, scale: Optional[Tuple[int, int]] = None,
              steps: int = 3) -> Dict[str, Any]:
    """The key column against the float mask on this device (module docstring, step 1).

    float32: the column under SDPA against the float mask under SDPA, within 1e-3. ``dtype``: the column under SDPA
    and FlashAttention-2 against the float mask under SDPA in ``dtype``, within twice the gap between two kernels
    running the same float mask (SDPA and eager: ``dtype``'s own rounding) plus 1e-3. Errors are the largest over
    the prefill's logits at the real positions and over the decoding steps' logits; every path must also give the
    reference's greedy tokens and Stage 3's kept tokens (in ``dtype``, near-ties can flip a selection against float32,
    so each precision has its own reference)."""
    import meteor_plugin
    from ..testing.llava import build_tiny_llava, make_batch

    spec = dataclasses.replace(_exactness_spec(scale), attn_implementation="sdpa", padding_side="left")
    model = build_tiny_llava(spec).to(device)
    model.generation_config.eos_token_id = None  # random weights: every row decodes all its steps
    ids, mask, images = make_batch([(35, 20), (30, 12)], [True, True], pad_side="left", vocab_size=spec.vocab_size,
                                   image_size=spec.image_size, seed=0)
    ids, mask, images = ids.to(device), mask.to(device), images.to(device)
    config = meteor_plugin.MeteorConfig(encoder=True, encoder_keep=0.5, fusion=False, llm=True, llm_min_keep=72,
                                        llm_max_keep=72, proportional_attention="on")
    flash = attention_implementation(device) == "flash_attention_2"
    low = str(dtype).replace("torch.", "")
    precisions = [("float32", torch.float32)] + ([(low, dtype)] if dtype != torch.float32 else [])
    rows: List[Dict[str, Any]] = []
    attachment = meteor_plugin.attach(model, config)  # this model prunes; the user's switch is left alone
    try:
        for name, precision in precisions:
            model.to(precision)
            pixels = images.to(precision)

            batch = (ids, mask, pixels, steps)
            ref = _path(model, "sdpa", True, batch)
            floor = _gaps(_path(model, "eager", True, batch), ref) if name != "float32" else None
            for impl in ("sdpa", "flash_attention_2") if flash and name != "float32" else ("sdpa",):
                row = {"dtype": name, "path": f"key column, {impl}", **_gaps(_path(model, impl, False, batch), ref)}
                bound = {k: (2 * floor[k] if floor else 0.0) + 1e-3 for k in ("prefill", "decode")}
                row["floor"] = floor
                row["passes"] = (row["prefill"] <= bound["prefill"] and row["decode"] <= bound["decode"]
                                 and row["tokens_equal"] and row["same_selection"])
                rows.append(row)
    finally:
        model.config._attn_implementation = "sdpa"
        attachment.detach()
    model.to("cpu")
    _free(device)
    return {"flash_attention_2": flash, "head_dim": spec.llm_hidden // spec.llm_heads, "llm_layers": spec.llm_layers,
            "rows": rows, "passes": all(r["passes"] for r in rows)}


def _path(model: Any, impl: str, masked: bool, batch: tuple):
    """One pruned call under attention ``impl``, with proportional attention's float mask or its key column."""
    from ..compat.key_column import float_mask

    model.config._attn_implementation = impl
    with float_mask() if masked else contextlib.nullcontext():
        return _run_llava(model, *batch)


def _gaps(run: Any, ref: Any) -> Dict[str, Any]:
    return {"prefill": float((run[0] - ref[0]).abs().max()), "decode": float((run[1] - ref[1]).abs().max()),
            "tokens_equal": bool(torch.equal(run[2], ref[2])), "same_selection": run[3] == ref[3],
            "logit_scale": float(ref[0].abs().max())}


# Speed ------------------------------------------------------------------------------------------------------
def _benches() -> Dict[str, Callable[..., Tuple[Dict[str, Any], str, str]]]:
    """bench name -> run(spec, settings) returning (result, unpruned variant, pruned variant)."""
    from . import eagle_prefill, llava_next_prefill, llava_prefill

    def llava(spec, s):
        return llava_prefill.run(llava_prefill.PrefillBench(**s), spec), "unpruned", "stage3"

    def llava_next(spec, s):
        return llava_next_prefill.run(llava_next_prefill.NextBench(**s), spec), "unpruned", "meteor"

    def eagle(spec, s):
        from ..testing.eagle_like import install

        install()
        return eagle_prefill.run(eagle_prefill.EagleBench(**s), spec), "unpruned", "meteor"

    def qwen_vl(spec, s):
        from . import qwen_vl_prefill

        return qwen_vl_prefill.run(qwen_vl_prefill.QwenBench(**s), spec), "unpruned", "meteor"

    return {"llava": llava, "llava-next": llava_next, "eagle": eagle, "qwen-vl": qwen_vl}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def speed(name: str, settings: GpuBench, device: torch.device, dtype: torch.dtype,
          log: Callable[..., None]) -> Dict[str, Any]:
    """One shape's row (module docstring, step 2)."""
    from . import shapes

    if name not in shapes.SHAPES:
        return {"shape": name, "skipped": "this version of meteor-plugin has no such shape (bench/shapes.py)"}
    bench, spec = shapes.shape(name)
    if bench == "qwen-vl":
        from .qwen_vl_prefill import unavailable

        if unavailable() is not None:
            return {"shape": name, "skipped": unavailable()}
    if settings.scale is not None:
        spec = shapes.scaled(spec, *settings.scale)
    try:
        params = shapes.check_memory(name, spec, device, dtype)
    except MemoryError as exc:
        return {"shape": name, "skipped": str(exc)}
    impl = attention_implementation(device)
    spec = dataclasses.replace(spec, attn_implementation=impl)
    log(f"bench gpu: {name} ({params / 1e9:.1f}B parameters, {impl}) ...")
    start = time.perf_counter()
    result, unpruned, pruned = _benches()[bench](spec, dict(repeats=settings.repeats, warmup=settings.warmup,
                                                           device=str(device), dtype=settings.dtype))
    _free(device)
    u, p = result["variants"][unpruned], result["variants"][pruned]
    return {"shape": name, "bench": bench, "attention": impl, "parameters": params, "seconds": time.perf_counter() - start,
            "tokens": (u["layer_tokens"], p["layer_tokens"]), "ms": (1000 * u["seconds"], 1000 * p["seconds"]),
            "gflops": (u["gflops"], p["gflops"]), "overhead_gflops": (u["overhead_gflops"], p["overhead_gflops"]),
            **{k: result[k] for k in ("speedup", "flops_ratio", "speedup_over_flops_ratio", "round_speedups", "target")},
            "machine": result["machine"]}


def unsupported_stack() -> Optional[str]:
    """Why this stack cannot run the GPU check (None where it can): the key column it checks runs on transformers 5."""
    import transformers

    from ..compat.transformers import generation

    if generation() != "5":
        return (f"bench gpu checks proportional attention's key column, which runs on transformers 5.x (this is "
                f"{transformers.__version__}): install the current stack, .ci/stacks/current.txt")
    return None


def run(settings: GpuBench = GpuBench(), log: Callable[..., None] = lambda *a: None) -> Dict[str, Any]:
    device = require_gpu(settings.device) if settings.scale is None else torch.device(settings.device)
    if unsupported_stack() is not None:
        raise ValueError(unsupported_stack())
    dtype = getattr(torch, settings.dtype)
    out: Dict[str, Any] = {"benchmark": "gpu", "settings": dataclasses.asdict(settings), "shapes": []}
    if settings.exactness:
        log("bench gpu: the key column against the float mask ...")
        out["exactness"] = exactness(device, dtype, settings.scale)
    for name in settings.shapes:
        out["shapes"].append(speed(name, settings, device, dtype, log))
    from .machine import describe

    out["machine"] = describe(device)
    return out


def _runs_text(values: List[int]) -> str:
    from .compare import runs_text

    return runs_text(values)


def report(result: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"meteor-plugin bench gpu: {result['machine']}, {s['dtype']}, median of {s['repeats']} interleaved runs"
             + (f" (shapes scaled down by {s['scale']}: a dry run)" if s["scale"] else ""), ""]
    ex = result.get("exactness")
    if ex:
        lines.append(f"key column against the float mask (head width {ex['head_dim']}, {ex['llm_layers']} layers, Stages 1 "
                     f"and 3, a left-padded batch of 2, prefill and 3 cached decoding steps; largest logit gap to the "
                     f"float mask under SDPA in the same precision): {'pass' if ex['passes'] else 'FAIL'}")
        for row in ex["rows"]:
            floor = row["floor"]
            noise = (f"; eager's gap {floor['prefill']:.1e} / {floor['decode']:.1e}" if floor else "")
            lines.append(f"  {row['dtype']:9}{row['path']:30} prefill {row['prefill']:.1e}  decoding {row['decode']:.1e}"
                         f" (logits up to {row['logit_scale']:.2f}{noise}); tokens "
                         f"{'equal' if row['tokens_equal'] else 'differ'}, selection "
                         f"{'equal' if row['same_selection'] else 'differs'}: {'pass' if row['passes'] else 'FAIL'}")
        if not ex["flash_attention_2"]:
            lines.append("  (flash_attn is not installed: FlashAttention-2 not checked)")
        lines.append("")
    head = (f"{'shape':15}{'attention':19}{'tokens per LLM layer, unpruned / pruned':>42}{'ms':>19}{'GFLOPs needed':>18}"
            f"{'speedup (rounds)':>22}{'ratio':>7}{'of it':>7}  target")
    lines += [head, "-" * len(head)]
    for row in result["shapes"]:
        if "skipped" in row:
            lines.append(f"{row['shape']:15}skipped: {row['skipped']}")
            continue
        rounds = row["round_speedups"]
        tokens = f"{_runs_text(row['tokens'][0])} / {_runs_text(row['tokens'][1])}"
        ms = f"{row['ms'][0]:.1f} / {row['ms'][1]:.1f}"
        gf = f"{row['gflops'][0]:.0f} / {row['gflops'][1]:.0f}"
        sp = f"{row['speedup']:.2f}x ({rounds[0]:.2f}-{rounds[-1]:.2f})"
        share = row["speedup_over_flops_ratio"]
        lines.append(f"{row['shape']:15}{row['attention']:19}{tokens:>42}{ms:>19}{gf:>18}{sp:>22}"
                     f"{row['flops_ratio']:>6.2f}x{100 * share:>6.0f}%  {100 * row['target']:.0f}% "
                     f"{'met' if share >= row['target'] else 'missed'}")
    return "\n".join(lines)
