"""Full-size model shapes for GPUs (``meteor-plugin bench --shape NAME``): random weights with the real 7B
dimensions, so a user's GPU times a prefill comparable with the figures peers publish.

| shape | bench | vision | language model |
|---|---|---|---|
| ``llava-1.5-7b`` | llava | CLIP-L/14 at 336 px (1024 wide, 24 blocks, MLP 4096): 576 tokens | Vicuna-7B (4096 wide, 32 layers, 32 heads, MLP 11008) |
| ``llava-next-7b`` | llava-next | the same CLIP on the base image and 2x2 crops of 672 px: 2880 tokens | the same |
| ``eagle-x4-7b`` | eagle | CLIP-L/14 at 336, ConvNeXt-XXL, SAM-L and Pix2Struct-large at EAGLE's 1024 px, on its 32x32 grid | the same |
| ``qwen2.5-vl-7b`` | qwen-vl | Qwen2.5-VL's ViT (1280 wide, 32 blocks, MLP 3420, windows of 112 px) on a 448x672 image: 384 tokens | Qwen2.5-7B (3584 wide, 28 layers, 28 heads, 4 KV heads, MLP 18944, M-RoPE) |

EAGLE-X4's towers are the stand-in's (``testing.eagle_like``) at their real widths, depths, patch sizes and
windows. On CUDA the language model uses FlashAttention-2 where ``flash_attn`` is installed (SDPA
otherwise, said in the report). ``check_memory`` refuses a shape the device cannot hold, before anything
is built. ``scaled`` divides widths and depths so a test runs every builder on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Dict, Tuple

import torch

from meteor_plugin.testing.llava import TinyLlavaSpec
from meteor_plugin.testing.qwen_vl import TinyQwenSpec

VICUNA_7B = dict(llm_hidden=4096, llm_layers=32, llm_heads=32, llm_kv_heads=32, llm_intermediate=11008,
                 vocab_size=32000, max_positions=4096)
CLIP_L_336 = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                  vision_intermediate=4096)


def x4_towers() -> Dict[str, Dict[str, Any]]:
    """EAGLE-X4's four encoders at their real sizes, as the stand-in's tower configs."""
    return {
        "clip-448": {"input_image_size": 336, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                     "num_hidden_layers": 24, "num_attention_heads": 16},
        "convnext-1024": {"input_image_size": 1024, "patch_size": 4, "hidden_sizes": [384, 768, 1536, 3072],
                          "depths": [3, 4, 30, 3]},
        "sam-1024": {"input_image_size": 1024, "patch_size": 16, "hidden_size": 1024, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "mlp_dim": 4096, "window_size": 14,
                     "global_attn_indexes": [5, 11, 17, 23], "output_channels": 256},
        "pix2struct-1024": {"input_image_size": 1024, "patch_size": 16, "max_patches": 2048, "hidden_size": 1536,
                            "d_ff": 3968, "d_kv": 64, "num_hidden_layers": 18, "num_attention_heads": 24},
    }


def _eagle_spec(**fields):
    from meteor_plugin.testing.eagle_like import TinyEagleSpec

    return TinyEagleSpec(**fields)


QWEN25_VL_7B = dict(kind="qwen2_5_vl", llm_hidden=3584, llm_layers=28, llm_heads=28, llm_kv_heads=4,
                   llm_intermediate=18944, vocab_size=152064, max_positions=128000, rope_theta=1000000.0,
                   mrope=(16, 24, 24), patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
                   vision_intermediate=3420, window_size=112, fullatt_blocks=(7, 15, 23, 31))

SHAPES = {
    "llava-1.5-7b": ("llava", lambda: TinyLlavaSpec(**CLIP_L_336, **VICUNA_7B)),
    "llava-next-7b": ("llava-next", lambda: TinyLlavaSpec(**CLIP_L_336, **VICUNA_7B, merge="spatial_unpad")),
    "eagle-x4-7b": ("eagle", lambda: _eagle_spec(towers=x4_towers(), image_size=1024, **VICUNA_7B)),
    "qwen2.5-vl-7b": ("qwen-vl", lambda: TinyQwenSpec(**QWEN25_VL_7B)),
}


def shape(name: str) -> Tuple[str, Any]:
    """(bench, spec) of a full-size shape."""
    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is unknown: allowed {', '.join(SHAPES)}")
    bench, build = SHAPES[name]
    return bench, build()


def _div(value: int, by: int, floor: int = 1) -> int:
    return max(floor, value // by)


def scaled(spec: Any, width: int, depth: int) -> Any:
    """``spec`` with every width divided by ``width`` and every depth by ``depth`` (at least 1 head of 8
    channels, 2 encoder blocks, ``llm_layer`` + 2 decoder layers); image sizes, patches and windows kept."""
    heads = _div(spec.llm_heads, width)
    llm = dict(llm_heads=heads, llm_kv_heads=_div(spec.llm_kv_heads, width),
               llm_hidden=heads * (spec.llm_hidden // spec.llm_heads),  # the head width kept, fewer heads
               llm_layers=_div(spec.llm_layers, depth, 4), llm_intermediate=_div(spec.llm_intermediate, width, 8))
    if isinstance(spec, TinyQwenSpec):
        vheads, vlayers = _div(spec.vision_heads, width), _div(spec.vision_layers, depth, 3)
        return dataclasses.replace(
            spec, **llm, mrope=None, vision_heads=vheads, vision_hidden=vheads * (spec.vision_hidden // spec.vision_heads),
            vision_layers=vlayers, vision_intermediate=_div(spec.vision_intermediate, width, 8),
            fullatt_blocks=(vlayers - 1,))  # the others attend within windows, as most of the real tower's blocks
    if isinstance(spec, TinyLlavaSpec):
        vheads = _div(spec.vision_heads, width)
        return dataclasses.replace(
            spec, **llm, vision_heads=vheads, vision_hidden=vheads * (spec.vision_hidden // spec.vision_heads),
            vision_layers=_div(spec.vision_layers, depth, 3),
            vision_intermediate=_div(spec.vision_intermediate or 2 * spec.vision_hidden, width, 8))
    towers = {}
    for name, t in spec.towers.items():
        t = dict(t)
        if "hidden_sizes" in t:
            t["hidden_sizes"] = [_div(h, width, 8) for h in t["hidden_sizes"]]
            t["depths"] = [_div(d, depth) for d in t["depths"]]
        else:
            t["num_attention_heads"] = _div(t["num_attention_heads"], width)
            per_head = t.get("d_kv") or t["hidden_size"] // spec.towers[name]["num_attention_heads"]
            t["hidden_size"] = t["num_attention_heads"] * per_head
            t["num_hidden_layers"] = _div(t["num_hidden_layers"], depth, 2)
            for key in ("intermediate_size", "mlp_dim", "d_ff"):
                if key in t:
                    t[key] = _div(t[key], width, 8)
            if "output_channels" in t:
                t["output_channels"] = _div(t["output_channels"], width, 8)
            if "global_attn_indexes" in t:
                t["global_attn_indexes"] = [t["num_hidden_layers"] - 1]
        towers[name] = t
    return dataclasses.replace(spec, **llm, towers=towers)


def parameters(spec: Any) -> int:
    """Parameters of the language model and the encoders (embeddings, attention, MLPs), estimated from the
    spec's dimensions: what decides whether a device can hold the model."""
    h, inter, layers = spec.llm_hidden, spec.llm_intermediate, spec.llm_layers
    kv = h * spec.llm_kv_heads // spec.llm_heads
    total = 2 * spec.vocab_size * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    if isinstance(spec, TinyLlavaSpec):
        v = spec.vision_hidden
        return total + spec.vision_layers * (4 * v * v + 2 * v * (spec.vision_intermediate or 2 * v))
    if isinstance(spec, TinyQwenSpec):  # gated MLPs in the tower; the merger maps 2x2 patches to the LLM width
        v, merged = spec.vision_hidden, spec.vision_hidden * spec.merge ** 2
        mlp = spec.vision_intermediate or 2 * v
        return total + spec.vision_layers * (4 * v * v + 3 * v * mlp) + merged * merged + merged * h
    for t in spec.towers.values():
        if "hidden_sizes" in t:
            total += sum(d * (2 * 4 * w * w) for w, d in zip(t["hidden_sizes"], t["depths"]))
        else:
            v = t["hidden_size"]
            mlp = t.get("intermediate_size") or t.get("mlp_dim") or t.get("d_ff")
            total += t["num_hidden_layers"] * (4 * v * v + 2 * v * mlp)
    return total


def _available(device: torch.device) -> Tuple[int, int]:
    """(bytes free on ``device``, bytes free in host memory, where the model is built first)."""
    host = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), host
    return host, host


def check_memory(name: str, spec: Any, device: torch.device, dtype: torch.dtype) -> int:
    """Refuse, naming the numbers, a shape whose weights (with room for activations) do not fit the device,
    or whose float32 build does not fit host memory. Returns the estimated parameter count."""
    params = parameters(spec)
    weights = params * torch.finfo(dtype).bits // 8
    need_device = int(weights * 1.5)  # activations of one prefill, the KV cache, the allocator's slack
    build = params * 4  # built in float32 on the host, then moved and cast
    need_host = build if device.type == "cuda" else need_device + (build if dtype != torch.float32 else 0)
    free, host = _available(device)
    gib = 2 ** 30
    if need_device > free or need_host > host:
        raise MemoryError(
            f"--shape {name} needs about {need_device / gib:.0f} GiB on {device} ({params / 1e9:.1f}B parameters in "
            f"{str(dtype).replace('torch.', '')} plus activations) and {need_host / gib:.0f} GiB of host memory to build "
            f"it, but {free / gib:.0f} GiB and {host / gib:.0f} GiB are free: run it on a GPU with enough memory "
            "(--device cuda --dtype bfloat16), or drop --shape for the CPU-sized models"
        )
    return params


def attention_for(device: torch.device) -> str:
    """FlashAttention-2 on CUDA where it is installed, else SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
