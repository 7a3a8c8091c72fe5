"""meteor-plugin demo: one prompt about a generated image, answered with pruning off and on.

Without ``--model-path`` it builds a random LLaVA in memory with LLaVA-1.5's 576 visual tokens (the
answer is then meaningless: the demo shows the mechanics, the token counts and the speedup). With
``--model-path`` it loads a LLaVA checkpoint through LLaVA's own loader and tokenizer.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Dict, List, Optional

import torch

import meteor_plugin
from meteor_plugin.testing.llava import IMAGE_TOKEN_INDEX, TinyLlavaSpec, build_tiny_llava

DEMO_SPEC = TinyLlavaSpec(image_size=336, patch_size=14, vision_hidden=128, vision_layers=4, vision_heads=2,
                          llm_hidden=512, llm_layers=8, llm_heads=8, llm_kv_heads=8, llm_intermediate=1408,
                          vocab_size=4096)
DEFAULT_PROMPT = "What is drawn in the top left corner of this picture?"


def draw_image(size: int = 336):
    """A picture with a few coloured shapes and a digit (PIL), deterministic."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    s = size // 6
    draw.ellipse([s // 2, s // 2, s // 2 + 2 * s, s // 2 + 2 * s], fill=(220, 40, 40))
    draw.rectangle([3 * s, 3 * s, 5 * s, 5 * s], fill=(40, 80, 220))
    draw.polygon([(s, 5 * s), (2 * s, 3 * s + s // 2), (3 * s, 5 * s)], fill=(40, 170, 60))
    draw.text((4 * s, s), "7", fill=(20, 20, 20))
    return img


def _word_ids(text: str, vocab: int) -> List[int]:
    """The random demo model has no tokenizer: words map to stable ids (0-2 are pad/bos/eos)."""
    return [3 + zlib.crc32(w.encode()) % (vocab - 3) for w in text.split()]


def _pixels(model: Any, image, processor: Optional[Any]) -> torch.Tensor:
    tower = model.get_vision_tower()
    processor = processor or getattr(tower, "image_processor", None)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    return pixels.to(device=model.device, dtype=model.dtype)


def run(model_path: Optional[str] = None, prompt: str = DEFAULT_PROMPT, config: Optional[meteor_plugin.MeteorConfig] = None,
        max_new_tokens: int = 16) -> Dict[str, Any]:
    meteor_plugin.disable()
    tokenizer = processor = None
    if model_path:
        from llava.mm_utils import get_model_name_from_path, tokenizer_image_token
        from llava.model.builder import load_pretrained_model

        tokenizer, model, processor, _ = load_pretrained_model(
            model_path, None, get_model_name_from_path(model_path), device_map="cpu", device="cpu")
        model = model.float()
        text = f"USER: <image>\n{prompt} ASSISTANT:"
        ids = tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        description = f"checkpoint {model_path}"
    else:
        model = build_tiny_llava(DEMO_SPEC)
        vocab = DEMO_SPEC.vocab_size
        ids = torch.tensor([[1] + _word_ids("USER:", vocab) + [IMAGE_TOKEN_INDEX] + _word_ids(prompt + " ASSISTANT:", vocab)])
        description = (f"random LLaVA-shaped model ({DEMO_SPEC.visual_tokens} visual tokens, LLM width "
                       f"{DEMO_SPEC.llm_hidden} x {DEMO_SPEC.llm_layers} layers): answers are meaningless")
    model.generation_config.eos_token_id = None if tokenizer is None else model.generation_config.eos_token_id
    pixels = _pixels(model, draw_image(), processor)
    config = config or meteor_plugin.MeteorConfig(llm_min_keep=0.25, llm_max_keep=0.25)
    results = {}
    for name in ("unpruned", "meteor"):
        if name == "meteor":
            meteor_plugin.enable(config)
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids, images=pixels, use_cache=True)  # prefill alone, for the speedup
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, images=pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=0)
            total = time.perf_counter() - start
        new = out[0, -max_new_tokens:].tolist() if tokenizer is None else out[0].tolist()
        answer = tokenizer.decode(new, skip_special_tokens=True).strip() if tokenizer else " ".join(f"<{t}>" for t in new)
        results[name] = {"answer": answer, "prefill_s": prefill, "generate_s": total}
    run_stats = meteor_plugin.stats(model)
    meteor_plugin.disable()
    return {"model": description, "prompt": prompt, "results": results,
            "stages": run_stats.to_dict()["samples"][0] if run_stats else {}}


def report(result: Dict[str, Any]) -> str:
    lines = [f"model: {result['model']}", f"prompt: {result['prompt']}", ""]
    for name, r in result["results"].items():
        lines.append(f"{name:>9}: {r['answer']}")
    lines.append("")
    for stage, counts in result["stages"].items():
        lines.append(f"{stage:>9}: {counts['in']} visual tokens in, {counts['out']} kept")
    if not result["stages"]:
        lines.append("no stage pruned anything")
    u, m = result["results"]["unpruned"], result["results"]["meteor"]
    lines.append(f"  prefill: {u['prefill_s']:.3f} s -> {m['prefill_s']:.3f} s ({u['prefill_s'] / m['prefill_s']:.2f}x); "
                 f"generate: {u['generate_s']:.3f} s -> {m['generate_s']:.3f} s ({u['generate_s'] / m['generate_s']:.2f}x)")
    return "\n".join(lines)
