"""``meteor-plugin calibrate --questions FILE.jsonl``: Stage 3's operating points on the user's own questions.

The file holds one question per line, in LLaVA's format: ``{"image": PATH, "question": TEXT, "answer": TEXT}``
(``"text"`` is read where there is no ``"question"``; PATH is relative to ``--image-folder``, else to the file's
folder). A reply is right when, lower-cased and stripped of surrounding punctuation, it equals the answer or
starts with it as a word; a one-letter answer (A-E) is a multiple-choice answer, compared with the reply's first
letter.

For each Stage 3 layer and each average budget (a ratio of the visual tokens entering Stage 3), a probe with every
token kept records Stage 3's budget signal per question, ``llm_lambda`` is solved so that the clipped budgets
average the target (``core.budget.solve_scale``; per question between a quarter and three times it), then every
question is answered and the prefill FLOPs of the first ones are counted (``flops.py``). The unpruned model is the
reference. ``choose`` takes the cheapest point whose accuracy is within the tolerance of the unpruned model's.
Everything runs in scopes (``patching.enabled``): the user's own switch is left as it is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from .config import MeteorConfig
from .core.budget import solve_scale
from .flops import count_flops
from .patching import enabled
from .progress import bar
from .stats import stats


@dataclass
class Question:
    image: str  # the image's path
    question: str
    answer: str
    line: int  # in the file, for messages


def load_questions(path: str, image_folder: Optional[str] = None, limit: Optional[int] = None) -> List[Question]:
    """The questions of a LLaVA-format .jsonl file; a missing file or image, an empty file or a line without a
    question or an answer is an error naming the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--questions {path}: no such file")
    base = image_folder or os.path.dirname(os.path.abspath(path))
    out: List[Question] = []
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            question = record.get("question", record.get("text"))
            missing = [name for name, value in (("image", record.get("image")), ("question", question),
                                                ("answer", record.get("answer"))) if value in (None, "")]
            if missing:
                raise ValueError(f"{path}:{number}: no {' and no '.join(missing)}")
            image = os.path.join(base, str(record["image"]))
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path}:{number}: image {image} not found")
            out.append(Question(image, str(question), str(record["answer"]), number))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"--questions {path}: no questions in it")
    return out


def normalised(text: str) -> str:
    return re.sub(r"^[\W_]+|[\W_]+$", "", text.strip().lower())


def is_right(reply: str, answer: str) -> bool:
    reply, answer = normalised(reply), normalised(answer)
    if len(answer) == 1 and answer in "abcde":
        return reply[:1] == answer
    return reply == answer or reply.startswith(answer + " ")


@dataclass
class Point:
    """One operating point: Stage 3 at ``layer`` keeping ``budget`` of the visual tokens entering it on average."""

    layer: Optional[int]  # None: the unpruned model
    budget: Optional[float]
    config: Optional[MeteorConfig]
    accuracy: float = 0.0
    gflops: float = 0.0
    kept: float = 0.0  # visual tokens Stage 3 kept, mean over the questions
    replies: List[str] = field(default_factory=list)

    def label(self) -> str:
        return "unpruned" if self.layer is None else f"layer {self.layer}, {self.budget:.3g} of the tokens"


class Asker:
    """Asks a model the questions under a config, through its family's prompt (``InferenceTarget.prompt``)."""

    def __init__(self, model: Any, processor: Any, family: Any, questions: Sequence[Question],
                 conv_mode: Optional[str] = None, max_new_tokens: int = 8, progress: bool = True):
        from PIL import Image

        self.model, self.processor, self.family = model, processor, family
        self.max_new_tokens, self.progress = max_new_tokens, progress
        kwargs = {} if conv_mode is None else {"conv_mode": conv_mode}
        self.inputs = [family.target.prompt(model, processor, Image.open(q.image).convert("RGB"), q.question, **kwargs)
                       for q in questions]

    def _decode(self, ids: torch.Tensor, prompt_len: int) -> str:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        new = ids[prompt_len:] if ids.shape[0] > prompt_len else ids
        return tokenizer.decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def answer(self, config: MeteorConfig, desc: str) -> tuple:
        """(replies, Stage 3's signal per question, visual tokens entering it, kept), under ``config``."""
        replies, signals, entering, kept = [], [], [], []
        with enabled(config), bar(len(self.inputs), desc, "q", self.progress) as progress:
            for inputs in self.inputs:
                rest = {k: v for k, v in inputs.items() if k != "input_ids"}  # LLaVA's generate takes the ids first
                out = self.model.generate(inputs["input_ids"], **rest, max_new_tokens=self.max_new_tokens,
                                          do_sample=False, num_beams=1)
                prompt_len = inputs["input_ids"].shape[1]
                starts_with_prompt = out.shape[1] > prompt_len and torch.equal(out[0, :prompt_len].cpu(),
                                                                              inputs["input_ids"][0].cpu())
                replies.append(self._decode(out[0], prompt_len if starts_with_prompt else 0))
                run = stats(self.model)
                llm = run.stages[0].get("llm") if run is not None else None
                signals.append(float(llm.detail["signal"]) if llm is not None else 0.0)
                entering.append(llm.entered if llm is not None else 0)
                kept.append(llm.left if llm is not None else 0)
                progress.update(1)
        return replies, signals, entering, kept

    def gflops(self, config: MeteorConfig, count: int) -> float:
        """Mean prefill GFLOPs of the first ``count`` questions under ``config``."""
        inputs = self.inputs[:max(1, count)]
        with torch.no_grad(), enabled(config):
            return sum(count_flops(lambda i=i: self.model(**i)) for i in inputs) / len(inputs) / 1e9


def default_layers(layers: int) -> List[int]:
    """A spread of Stage 3 layers over a language model of ``layers`` decoder layers (never 0)."""
    return sorted({max(1, min(layers - 1, x)) for x in (1, 2, layers // 4, layers // 2, (3 * layers) // 4, layers - 1)})


def sweep(asker: Asker, base: MeteorConfig, layers: Sequence[int], budgets: Sequence[float],
          flops_questions: int = 8, log: Callable[[str], None] = print) -> List[Point]:
    """The unpruned point, then one point per (layer, budget), each measured on every question."""
    off = base.replace(encoder=False, fusion=False, llm=False)
    unpruned = Point(None, None, None)
    unpruned.replies, _, _, _ = asker.answer(off, "unpruned")
    unpruned.gflops = asker.gflops(off, flops_questions)
    points = [unpruned]
    for layer in layers:
        probe = base.replace(llm=True, llm_layer=int(layer), llm_min_keep=1.0, llm_max_keep=1.0,
                             llm_lambda=1.0)  # lambda 1 with every token kept: the coverage count never stops early
        _, signals, entering, _ = asker.answer(probe, f"layer {layer}: Stage 3 signal")
        for budget in budgets:
            low = [max(2.0, budget / 4 * n) for n in entering]
            high = [min(float(n), 3 * budget * n) for n in entering]
            target = budget * sum(entering) / len(entering)
            lam = solve_scale(signals, target, low, high)
            config = base.replace(llm=True, llm_layer=int(layer), llm_lambda=lam,
                                  llm_min_keep=max(budget / 4, 2 / max(1, min(entering))), llm_max_keep=min(1.0, 3 * budget))
            point = Point(int(layer), float(budget), config)
            point.replies, _, _, kept = asker.answer(config, f"layer {layer}, {budget:g}")
            point.kept = sum(kept) / len(kept)
            point.gflops = asker.gflops(config, flops_questions)
            points.append(point)
    return points


def score(points: List[Point], questions: Sequence[Question]) -> None:
    for point in points:
        point.accuracy = sum(is_right(r, q.answer) for r, q in zip(point.replies, questions)) / len(questions)


def choose(points: List[Point], tolerance: float) -> tuple:
    """(chosen point, whether it keeps the unpruned accuracy within ``tolerance``): the cheapest that does, else the
    most accurate pruned one."""
    unpruned, pruned = points[0], points[1:]
    good = [p for p in pruned if p.accuracy >= (1 - tolerance) * unpruned.accuracy]
    if good:
        return min(good, key=lambda p: (p.gflops, -p.accuracy)), True
    return max(pruned, key=lambda p: (p.accuracy, -p.gflops)), False


def table(points: List[Point], chosen: Optional[Point] = None) -> str:
    head = f"{'operating point':<34} {'accuracy':>9} {'GFLOPs':>9} {'of unpruned':>12} {'kept tokens':>12}"
    lines = [head, "-" * len(head)]
    full = points[0].gflops or 1.0
    for p in points:
        mark = "  <- chosen" if p is chosen else ""
        kept = f"{p.kept:.1f}" if p.layer is not None else "all"
        lines.append(f"{p.label():<34} {p.accuracy:>9.3f} {p.gflops:>9.3f} {p.gflops / full:>11.0%} {kept:>12}{mark}")
    return "\n".join(lines)


def plot(points: List[Point], path: str) -> str:
    """Accuracy against prefill GFLOPs, one line per Stage 3 layer, the unpruned model as a dashed line (Pillow)."""
    from PIL import Image, ImageDraw

    width, height, left, top, right, bottom = 640, 420, 60, 30, 150, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    x_max = max(p.gflops for p in points) * 1.05 or 1.0
    x = lambda v: left + (width - left - right) * v / x_max  # noqa: E731
    y = lambda v: top + (height - top - bottom) * (1 - v)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, y(v) - 6), f"{v:.2f}", fill="black")
    draw.text((left, height - bottom + 8), f"0 ... {x_max:.2f} prefill GFLOPs", fill="black")
    draw.text((left, 8), "accuracy on your questions against prefill cost", fill="black")
    unpruned = points[0]
    for i in range(int(x(0)), int(x(x_max)), 8):
        draw.line([i, y(unpruned.accuracy), i + 4, y(unpruned.accuracy)], fill=(90, 90, 90))
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
    for n, layer in enumerate(sorted({p.layer for p in points[1:]})):
        row = sorted((p for p in points[1:] if p.layer == layer), key=lambda p: p.gflops)
        colour = colours[n % len(colours)]
        xy = [(x(p.gflops), y(p.accuracy)) for p in row]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right + 10, top + 16 * n), f"Stage 3 at layer {layer}", fill=colour)
    draw.text((width - right + 10, top + 16 * (n + 1) if points[1:] else top), "- - unpruned", fill=(90, 90, 90))
    img.save(path)
    return path
