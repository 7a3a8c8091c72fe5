"""meteor-plugin demo: one question about a generated image, answered with pruning off and on.

By default it loads the trained fidelity model shipped in the package (a small EAGLE-like model with a
CLIP ViT and a ConvNeXt, see ``meteor_plugin/fidelity``), generates a scene and a question of the task,
and prints the expected answer, the answers with pruning off and with METEOR's three stages on (the
checkpoint's calibrated config, 24% of the visual tokens), the tokens kept per stage and the speedup.
``--model-path`` loads a LLaVA checkpoint through LLaVA's own loader and tokenizer instead;
``--random-llava`` builds a random LLaVA in memory with LLaVA-1.5's 576 visual tokens (answers are then
meaningless: it shows the mechanics, the token counts and the speedup at a realistic token count).
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


FIDELITY_CONFIG = "meteor-24.json"  # METEOR at 24% of the visual tokens, calibrated on the validation split


def _median_prefill(model, inputs: Dict[str, Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs, use_cache=False)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_fidelity(question: Optional[str] = None, seed: int = 0, config: Optional[meteor_plugin.MeteorConfig] = None,
                 model_path: Optional[str] = None, repeats: int = 7) -> Dict[str, Any]:
    """The trained fidelity model answers one question about test scene ``seed``, pruning off and on."""
    import os

    from .fidelity import checkpoint_path, make_sample, valid_questions
    from .fidelity.llava_format import prompt_ids
    from .fidelity.model import load, pixels, unpruned_config
    from .fidelity.questions import KINDS, TEMPLATES

    path = model_path or checkpoint_path()
    if config is None:
        stored = os.path.join(path, FIDELITY_CONFIG)
        if not os.path.isfile(stored):
            raise FileNotFoundError(f"{stored} is missing: give --config, or recalibrate the checkpoint")
        config = meteor_plugin.MeteorConfig.from_file(stored)
    sample = make_sample("test", seed, max_turns=1)
    scene = sample.scene
    asked = sample.question
    if question is not None:
        known = {q.text: q for kind in KINDS for q in valid_questions(scene, kind)}
        text = " ".join(question.replace("?", " ? ").split())
        if text not in known:
            raise ValueError(
                f"{question!r} has no single answer for scene {seed} (the fidelity model knows the task's questions: "
                f"{'; '.join(TEMPLATES.values())}); this scene answers: {'; '.join(sorted(known))}")
        asked = known[text]
    model, tokenizer = load(path)
    inputs = {"input_ids": torch.tensor([prompt_ids(tokenizer, asked.text)]), "images": pixels(sample.image[None])}
    results = {}
    stages: Dict[str, Any] = {}
    for name, cfg in (("unpruned", unpruned_config()), ("meteor", config)):
        meteor_plugin.enable(cfg)
        with torch.no_grad():
            prefill = _median_prefill(model, inputs, repeats)
            logits = model(**inputs, use_cache=False).logits[0, -1]
        answer = tokenizer.convert_ids_to_tokens(int(logits.argmax()))
        results[name] = {"answer": answer, "prefill_s": prefill, "correct": answer == asked.answer}
        run_stats = meteor_plugin.stats(model)
        stages = run_stats.to_dict()["samples"][0] if run_stats else {}
    meteor_plugin.disable()
    objects = ", ".join(f"{o.colour} {o.shape} (row {o.row}, col {o.col})" for o in scene.objects)
    digit = f"; digit {scene.digit.value} (row {scene.digit.row}, col {scene.digit.col})" if scene.digit else ""
    return {"model": f"fidelity checkpoint {path} (trained EAGLE-like model: CLIP ViT 32 px + ConvNeXt 64 px, "
                     f"128 visual tokens)",
            "scene": f"test scene {seed}: {objects}{digit}", "prompt": asked.text, "kind": asked.kind,
            "expected": asked.answer, "results": results, "stages": stages, "config": config.to_dict()}


def report(result: Dict[str, Any]) -> str:
    lines = [f"model: {result['model']}"]
    if "scene" in result:
        lines.append(result["scene"])
    lines += [f"prompt: {result['prompt']}", ""]
    if "expected" in result:
        lines.append(f" expected: {result['expected']}")
    for name, r in result["results"].items():
        mark = "" if "correct" not in r else ("  (right)" if r["correct"] else "  (wrong)")
        lines.append(f"{name:>9}: {r['answer']}{mark}")
    lines.append("")
    for stage, counts in result["stages"].items():
        lines.append(f"{stage:>9}: {counts['in']} visual tokens in, {counts['out']} kept")
    if not result["stages"]:
        lines.append("no stage pruned anything")
    u, m = result["results"]["unpruned"], result["results"]["meteor"]
    line = f"  prefill: {u['prefill_s']:.4f} s -> {m['prefill_s']:.4f} s ({u['prefill_s'] / m['prefill_s']:.2f}x)"
    if "generate_s" in u:
        line += (f"; generate: {u['generate_s']:.3f} s -> {m['generate_s']:.3f} s "
                 f"({u['generate_s'] / m['generate_s']:.2f}x)")
    lines.append(line)
    return "\n".join(lines)
