"""meteor-plugin demo: questions about a generated image, answered with pruning off and on.

By default it loads the trained fidelity model shipped in the package (a small EAGLE-like model with a
CLIP ViT and a ConvNeXt, see ``meteor_plugin/fidelity``), generates a scene, asks it one question of every
kind the scene answers, and prints for each the expected answer, the answers with pruning off and with
METEOR's three stages on (the checkpoint's calibrated config, 24% of the visual tokens) and the tokens
kept per stage; with ``--scenes N``, how often the answers stay and the mean tokens kept per stage. It prints no
speed: this model (208 visual tokens) is too small to show one, and ``meteor-plugin bench`` measures it.
``--save-map`` draws where each stage's kept tokens are, per encoder, with the question and both answers.
``--model-path`` loads a LLaVA or EAGLE checkpoint through its codebase's own loader and tokenizer instead
(``--image-file``: the user's own image, default a drawn one); ``--random-llava`` builds a random LLaVA in memory with LLaVA-1.5's 576 visual tokens (answers are then
meaningless: it shows the mechanics, the token counts and the speedup at a realistic token count). These print
the prefill time (`interleaved_prefill`: the median of interleaved rounds after a warm-up, the speedup the ratio of
those medians).
"""

from __future__ import annotations

import statistics
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
    tower = model.get_model().get_vision_tower()
    processor = processor or getattr(tower, "image_processor", None)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    return pixels.to(device=model.device, dtype=model.dtype)


def run(model_path: Optional[str] = None, prompt: str = DEFAULT_PROMPT, config: Optional[meteor_plugin.MeteorConfig] = None,
        max_new_tokens: int = 16, repeats: Optional[int] = None, image_file: Optional[str] = None) -> Dict[str, Any]:
    tokenizer = processor = None
    image = draw_image()
    if image_file is not None:
        import os

        from PIL import Image

        if not os.path.isfile(image_file):
            raise FileNotFoundError(f"--image-file {image_file}: no such file")
        image = Image.open(image_file).convert("RGB")
    if model_path:
        require_checkpoint(model_path, "--model-path")
        from .calibrate import load_checkpoint

        tokenizer, model = load_checkpoint(model_path)  # LLaVA's or EAGLE's own loader
        text = f"USER: <image>\n{prompt} ASSISTANT:"
        before, after = text.split("<image>")
        ids = torch.tensor([tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX]
                            + tokenizer(after, add_special_tokens=False).input_ids])
        description = f"checkpoint {model_path}"
    else:
        from .compat.transformers import quiet_loading

        with quiet_loading():  # built in memory: the save/load round trip inside is no news to a user
            model = build_tiny_llava(DEMO_SPEC)
        vocab = DEMO_SPEC.vocab_size
        ids = torch.tensor([[1] + _word_ids("USER:", vocab) + [IMAGE_TOKEN_INDEX] + _word_ids(prompt + " ASSISTANT:", vocab)])
        description = (f"random LLaVA-shaped model ({DEMO_SPEC.visual_tokens} visual tokens, LLM width "
                       f"{DEMO_SPEC.llm_hidden} x {DEMO_SPEC.llm_layers} layers): answers are meaningless")
    model.generation_config.eos_token_id = None if tokenizer is None else model.generation_config.eos_token_id
    pixels = _pixels(model, image, processor)
    if config is None and model_path:  # a converted checkpoint prunes as it was converted or trained to
        from .runtime import stored_config

        config = stored_config(model.config)
    config = config or meteor_plugin.MeteorConfig(llm_min_keep=0.25, llm_max_keep=0.25)
    off = meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=False)
    results = {}
    for name, cfg in (("unpruned", off), ("meteor", config)):
        with torch.no_grad(), meteor_plugin.enabled(cfg):
            out = model.generate(ids, images=pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=0)
        new = out[0, -max_new_tokens:].tolist() if tokenizer is None else out[0].tolist()
        answer = tokenizer.decode(new, skip_special_tokens=True).strip() if tokenizer else " ".join(f"<{t}>" for t in new)
        results[name] = {"answer": answer}
        if name == "meteor":
            run_stats = meteor_plugin.stats(model)
    timing = interleaved_prefill(lambda: model(input_ids=ids, images=pixels, use_cache=True),
                                 {"unpruned": off, "meteor": config}, REPEATS if repeats is None else repeats)
    return {"model": description, "prompt": prompt, "results": results, "timing": timing, "config": config.to_dict(),
            "stages": run_stats.to_dict()["samples"][0] if run_stats else {}}


def require_checkpoint(path: str, flag: str) -> None:
    """A local checkpoint folder, or a one-line error naming the flag (not the hub's "Repo id must be..."
    that a missing local path otherwise ends in)."""
    import os

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such folder (a checkpoint folder on this machine is needed)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path}: not a checkpoint folder (it has no config.json)")


FIDELITY_CONFIG = "meteor-24.json"  # METEOR at 24% of the visual tokens, calibrated on the validation split


REPEATS = 9  # timed rounds of a LLaVA demo


def interleaved_prefill(prefill, variants: Dict[str, Any], repeats: int, warmup: int = 2) -> Dict[str, Any]:
    """Prefill seconds of each variant (name -> config to enable), measured side by side: ``warmup`` untimed
    rounds, then ``repeats`` rounds running every variant once, the order reversed every other round (neither
    always goes first). The plugin's patches are installed once, around every round (a scope per round would
    patch and restore the classes each time, and Stage 3 would patch its layer classes inside the timed call).
    Returns per variant the median, min and max seconds, and the speedup as the first variant's median over the
    last's: the same statistic as the times printed beside it."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is invalid: allowed >= 1")
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad(), meteor_plugin.enabled(variants[names[0]]):  # the patches, for every round
        for r in range(warmup + repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                with meteor_plugin.enabled(variants[name]):
                    start = time.perf_counter()
                    prefill()
                    elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name].append(elapsed)
    out: Dict[str, Any] = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for n, t in times.items()}
    out["speedup"] = {"median_ratio": out[names[0]]["median_s"] / out[names[-1]]["median_s"], "rounds": repeats,
                      "warmup": warmup}
    return out


def _scene_questions(scene, seed: int, question: Optional[str]) -> List[Any]:
    """One question of every kind the scene answers, or ``question`` (refused if the scene has no answer)."""
    from .fidelity import valid_questions
    from .fidelity.questions import KINDS, TEMPLATES

    known = {q.text: q for kind in KINDS for q in valid_questions(scene, kind)}
    if question is None:
        return [next(q for q in known.values() if q.kind == kind) for kind in KINDS
                if any(q.kind == kind for q in known.values())]
    text = " ".join(question.replace("?", " ? ").split())
    if text not in known:
        raise ValueError(
            f"{question!r} has no single answer for scene {seed} (the fidelity model knows the task's questions: "
            f"{'; '.join(TEMPLATES.values())}); this scene answers: {'; '.join(sorted(known))}")
    return [known[text]]


def run_fidelity(question: Optional[str] = None, seed: int = 0, config: Optional[meteor_plugin.MeteorConfig] = None,
                 model_path: Optional[str] = None, save_map: Optional[str] = None,
                 scenes: int = 1) -> Dict[str, Any]:
    """The trained fidelity model answers questions about test scenes ``seed .. seed + scenes - 1`` (one of
    every kind each scene answers, or ``question``), pruning off and on; the mean tokens kept per stage over
    every question; the map is drawn on the first scene's first question."""
    import os

    from .fidelity import checkpoint_path, make_sample
    from .fidelity.llava_format import prompt_ids
    from .fidelity.model import VISUAL_TOKENS, encoder_titles, load, pixels, unpruned_config

    if scenes < 1:
        raise ValueError(f"scenes={scenes} is invalid: allowed >= 1")
    path = model_path or checkpoint_path()
    require_checkpoint(path, "--fidelity-model")
    if config is None:
        stored = os.path.join(path, FIDELITY_CONFIG)
        if not os.path.isfile(stored):
            raise FileNotFoundError(f"{stored} is missing: give --config, or recalibrate the checkpoint")
        config = meteor_plugin.MeteorConfig.from_file(stored)
    model, tokenizer = load(path)
    asked_scenes = []
    for s in range(seed, seed + scenes):
        sample = make_sample("test", s, max_turns=1)
        image = pixels(sample.image[None])
        answers = []
        for q in _scene_questions(sample.scene, s, question):
            inputs = {"input_ids": torch.tensor([prompt_ids(tokenizer, q.text)]), "images": image}
            row = {"prompt": q.text, "kind": q.kind, "expected": q.answer}
            for name, cfg in (("unpruned", unpruned_config()), ("meteor", config)):
                with torch.no_grad(), meteor_plugin.enabled(cfg):
                    logits = model(**inputs, use_cache=False).logits[0, -1]
                    run_stats = meteor_plugin.stats(model)
                row[name] = tokenizer.convert_ids_to_tokens(int(logits.argmax()))
            row["stages"] = run_stats.to_dict()["samples"][0] if run_stats else {}
            answers.append(row)
        asked_scenes.append({"seed": s, "scene": _describe(sample.scene), "answers": answers})
        if s == seed:
            first_image = sample.image
    first = asked_scenes[0]
    meteor_plugin.detach(model)  # load() attached it
    rows = [a for entry in asked_scenes for a in entry["answers"]]
    titles = encoder_titles()
    result = {"model": f"fidelity checkpoint {path} (trained EAGLE-like model: {'; '.join(titles.values())}; "
                       f"{VISUAL_TOKENS} visual tokens)",
              "scenes": asked_scenes, "config": config.to_dict(), "mean_stages": mean_stages(rows),
              "agreement": {"questions": sum(a["unpruned"] == a["meteor"] for a in rows), "of_questions": len(rows),
                            "scenes": sum(all(a["unpruned"] == a["meteor"] for a in e["answers"]) for e in asked_scenes),
                            "of_scenes": len(asked_scenes)}}
    if save_map:
        from .fidelity.token_map import caption, draw_map, grid_sides, kept_cells

        asked = first["answers"][0]
        stages = asked["stages"]
        sides = grid_sides(stages["encoder"]["per_encoder"])
        lines = caption(asked["prompt"], asked["unpruned"], asked["meteor"], asked["expected"])
        drawn = draw_map(first_image, kept_cells(stages, list(sides)), sides, save_map, lines, titles)
        result["map"] = {"path": os.path.abspath(drawn), "question": asked["prompt"], "caption": lines,
                         "rows": [titles.get(name, name) for name in sides]}
    return result


def mean_stages(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per stage, the mean visual tokens entering and kept over the questions (a question a stage did not run on
    counts nothing for it)."""
    out: Dict[str, Dict[str, float]] = {}
    for stage in dict.fromkeys(name for row in rows for name in row["stages"]):
        counts = [row["stages"][stage] for row in rows if stage in row["stages"]]
        out[stage] = {"in": statistics.fmean(c["in"] for c in counts), "out": statistics.fmean(c["out"] for c in counts),
                      "questions": len(counts)}
    return out


def _describe(scene) -> str:
    at = lambda box: f"at x {(box[0] + box[2]) // 2}, y {(box[1] + box[3]) // 2}"  # noqa: E731
    objects = ", ".join(f"{o.colour} {o.shape} {at(o.box)}" for o in scene.objects)
    digit = f"; digit {scene.digit.value} {at(scene.digit.box)}" if scene.digit else ""
    return f"{scene.background} background; {objects}{digit}"


def _stage_lines(stages: Dict[str, Any], indent: str) -> List[str]:
    if not stages:
        return [f"{indent}no stage pruned anything"]
    return [f"{indent}{stage:>8}: {counts['in']} visual tokens in, {counts['out']} kept" for stage, counts in stages.items()]


def report_fidelity(result: Dict[str, Any]) -> str:
    lines = [f"model: {result['model']}"]
    for entry in result["scenes"]:
        lines += ["", f"test scene {entry['seed']}: {entry['scene']}"]
        for a in entry["answers"]:
            mark = lambda x: "right" if x == a["expected"] else "wrong"  # noqa: E731
            changed = "" if a["unpruned"] == a["meteor"] else "  <- pruning changed the answer"
            lines.append(f"  {a['kind']}: {a['prompt']}")
            lines.append(f"    expected {a['expected']}; unpruned {a['unpruned']} ({mark(a['unpruned'])}); "
                         f"meteor {a['meteor']} ({mark(a['meteor'])}){changed}")
            lines += _stage_lines(a["stages"], "    ")
    g = result["agreement"]
    lines.append(f"\npruned answers equal to unpruned: {g['questions']} of {g['of_questions']} questions; every "
                 f"question of a scene: {g['scenes']} of {g['of_scenes']} scenes")
    means = result["mean_stages"]
    if means:
        lines.append(f"mean visual tokens per question over {g['of_questions']} questions: " + "; ".join(
            f"{stage} {m['in']:.1f} in, {m['out']:.1f} kept" for stage, m in means.items()))
    lines.append("speed: not measured here (this model is too small to show it); run `meteor-plugin bench`")
    if "map" in result:
        lines.append(f"map of the kept tokens ({result['map']['question']}): {result['map']['path']}")
    return "\n".join(lines)


def _timing_line(t: Dict[str, Any], what: str) -> str:
    sp = t["speedup"]
    span = lambda v: f"{v['median_s'] * 1e3:.2f} ms ({v['min_s'] * 1e3:.2f}-{v['max_s'] * 1e3:.2f})"  # noqa: E731
    return (f"prefill ({what}; median, and range, of {sp['rounds']} interleaved rounds after {sp['warmup']} warm-up "
            f"rounds): unpruned {span(t['unpruned'])}, meteor {span(t['meteor'])}: {sp['median_ratio']:.2f}x "
            "(the ratio of the medians)")


def report(result: Dict[str, Any]) -> str:
    """The text of ``run`` (a LLaVA checkpoint or the random LLaVA)."""
    lines = [f"model: {result['model']}", f"prompt: {result['prompt']}", ""]
    for name, r in result["results"].items():
        lines.append(f"{name:>9}: {r['answer']}")
    lines.append("")
    lines += _stage_lines(result["stages"], " ")
    lines.append(_timing_line(result["timing"], "batch 1"))
    return "\n".join(lines)
