"""Questions of the fidelity testbed (v2): kinds, answers computed from the scene, balanced generation.

| kind       | question                              | answers                   | chance | visual demand         |
|------------|---------------------------------------|---------------------------|--------|-----------------------|
| background | what colour is the background ?       | grey, cream, sky, rose    | 1/4    | global: any few tokens |
| colour     | what colour is the <shape> ?          | 6 colours                 | 1/6    | one object             |
| digit      | what digit is in the image ?          | 0..9                      | 1/10   | one small glyph        |
| count      | how many <colour> objects are there ? | zero..three               | 1/4    | every object, spread   |

They span visual demand as the testbed issue asks: ``background`` is answered by any handful of
background tokens, ``colour`` needs the one object of that shape, ``digit`` a 10x16 px glyph (2x2 to 3x3 tokens
of the full-resolution encoder; the low-resolution one cannot read it), ``count`` every object of a
colour among 3-7 spread over the image, so each pruned object can change the answer.

Answers come from one place, `answer_for(scene, kind, target)`, which also says when a question is not
valid for a scene (``None``). Generation is conditioned on the kind and the answer, so a split cycles
through every answer evenly. A digit is drawn in every digit scene and, as a distractor, in half of the
others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .scenes import BACKGROUNDS, COLOURS, MAX_PER_COLOUR, SHAPES, Scene, box_tokens, make_scene

KINDS = ("background", "colour", "digit", "count")
COUNT_WORDS = ("zero", "one", "two", "three")
DIGIT_WORDS = tuple(str(d) for d in range(10))
ANSWERS: Dict[str, Tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "colour": COLOURS,
    "digit": DIGIT_WORDS,
    "count": COUNT_WORDS,
}
# What a question of each kind is about: a shape, a colour, or nothing.
TARGETS: Dict[str, Tuple[Optional[str], ...]] = {
    "background": (None,),
    "colour": SHAPES,
    "digit": (None,),
    "count": COLOURS,
}
TEMPLATES = {
    "background": "what colour is the background ?",
    "colour": "what colour is the {} ?",
    "digit": "what digit is in the image ?",
    "count": "how many {} objects are there ?",
}
OBJECTS = (3, 7)  # inclusive range of shapes per scene
DISTRACTOR_DIGIT = 0.5  # chance of a digit in scenes whose question is not about it


@dataclass(frozen=True)
class Question:
    kind: str
    target: Optional[str]  # the shape (colour), the colour (count), or None
    text: str
    answer: str


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed {', '.join(KINDS)}")


def _check_target(kind: str, target: Optional[str]) -> None:
    if target not in TARGETS[kind]:
        allowed = "None" if TARGETS[kind] == (None,) else ", ".join(TARGETS[kind])
        raise ValueError(f"target={target!r} is invalid for kind {kind!r}: allowed {allowed}")


def question_text(kind: str, target: Optional[str] = None) -> str:
    _check_kind(kind)
    _check_target(kind, target)
    return TEMPLATES[kind].format(target)


def answer_for(scene: Scene, kind: str, target: Optional[str] = None) -> Optional[str]:
    """The answer to a question about ``scene``, or None when the question has no single answer."""
    _check_kind(kind)
    _check_target(kind, target)
    if kind == "background":
        return scene.background
    if kind == "colour":
        found = scene.with_shape(target)
        return found[0].colour if len(found) == 1 else None
    if kind == "count":
        n = scene.count(target)
        return COUNT_WORDS[n] if n < len(COUNT_WORDS) else None
    return str(scene.digit.value) if scene.digit is not None else None


def valid_questions(scene: Scene, kind: str) -> List[Question]:
    """Every question of ``kind`` that has a single answer for ``scene``."""
    _check_kind(kind)
    out = []
    for target in TARGETS[kind]:
        answer = answer_for(scene, kind, target)
        if answer is not None:
            out.append(Question(kind, target, question_text(kind, target), answer))
    return out


def answer_region(scene: Scene, question: Question, grid: int = 12) -> np.ndarray:
    """Boolean (grid, grid) mask of the patches that hold what the answer depends on.

    For pruning diagnostics ("did the kept tokens cover the evidence?"): the queried shape, every
    object of the counted colour (none when the count is zero), the digit's ink; nothing for the
    background (any background token will do).
    """
    _check_kind(question.kind)
    mask = np.zeros((grid, grid), dtype=bool)
    boxes = []
    if question.kind == "colour":
        boxes = [o.box for o in scene.with_shape(question.target)]
    elif question.kind == "count":
        boxes = [o.box for o in scene.objects if o.colour == question.target]
    elif question.kind == "digit":
        boxes = [scene.digit.box] if scene.digit is not None else []
    for box in boxes:
        mask |= box_tokens(box, grid)
    return mask


# ---- generation conditioned on kind and answer -------------------------------------------------------

def _colours(rng: random.Random, k: int, allowed: Sequence[str], taken: Sequence[str]) -> List[str]:
    """``k`` colours drawn with replacement from ``allowed``, never more than MAX_PER_COLOUR of one
    (counting ``taken``). With replacement, so that counts above one occur."""
    counts = {c: list(taken).count(c) for c in COLOURS}
    out = []
    for _ in range(k):
        c = rng.choice([c for c in allowed if counts[c] < MAX_PER_COLOUR])
        counts[c] += 1
        out.append(c)
    return out


def generate(kind: str, answer: str, rng: random.Random) -> Tuple[Scene, Question]:
    """A random scene whose question of ``kind`` has the answer ``answer``, and that question."""
    _check_kind(kind)
    if answer not in ANSWERS[kind]:
        raise ValueError(f"answer={answer!r} is invalid for kind {kind!r}: allowed {', '.join(ANSWERS[kind])}")
    target, background = None, None
    n = rng.randint(*OBJECTS)
    if kind == "colour":
        target = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != target]
        shapes = [target] + [rng.choice(others) for _ in range(n - 1)]
        colours = [answer] + _colours(rng, n - 1, COLOURS, [answer])
    elif kind == "count":
        target = rng.choice(COLOURS)
        want = COUNT_WORDS.index(answer)
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        colours = [target] * want + _colours(rng, n - want, [c for c in COLOURS if c != target], [])
    else:
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        colours = _colours(rng, n, COLOURS, [])
        if kind == "background":
            background = answer
    order = list(range(n))
    rng.shuffle(order)  # the object list's order says nothing about the question
    objects = [(shapes[i], colours[i]) for i in order]
    if kind == "digit":
        digit = int(answer)
    else:
        digit = rng.randrange(10) if rng.random() < DISTRACTOR_DIGIT else None
    scene = make_scene(rng, objects, digit, background)
    question = Question(kind, target, question_text(kind, target), answer)
    if answer_for(scene, kind, target) != answer:  # a bug here would silently corrupt every label
        raise RuntimeError(f"generated scene answers {answer_for(scene, kind, target)!r}, not {answer!r}")
    return scene, question


def pack_turns(scene: Scene, primary: Question, rng: random.Random,
               max_turns: Optional[int] = None, per_kind: int = 1) -> Tuple[Question, ...]:
    """Questions for one image in LLaVA-style multi-turn training: the primary one plus random valid
    questions of the kinds, ``per_kind`` of each kind at most (the primary counts for its own kind),
    each drawn by picking an answer uniformly among those the scene allows and then a question with
    it, in random order, at most ``max_turns`` (None: no limit).

    The note found packing several answered questions per image (about 3.4 there) needed for
    learning. ``per_kind`` > 1 packs more answers per image (more colours to count, more shapes to
    name) for little more sequence: the visual tokens dominate a step's cost.
    """
    if max_turns is not None and (isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1):
        raise ValueError(f"max_turns={max_turns!r} is invalid: allowed None or an int >= 1")
    if isinstance(per_kind, bool) or not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind={per_kind!r} is invalid: allowed an int >= 1")
    if max_turns == 1:
        return (primary,)
    extra = []
    for kind in KINDS:
        wanted = per_kind - (kind == primary.kind)
        if wanted <= 0:
            continue
        # pick the answer first, then a question with it: otherwise "how many <colour>" would
        # mostly ask about absent colours and answer "zero"
        by_answer: Dict[str, List[Question]] = {}
        for q in valid_questions(scene, kind):
            if q != primary:
                by_answer.setdefault(q.answer, []).append(q)
        for _ in range(wanted):
            if not by_answer:
                break
            answer = rng.choice(list(by_answer))
            pick = rng.choice(by_answer[answer])
            extra.append(pick)
            if per_kind > 1:  # (with one per kind the draw is exactly the original one)
                by_answer[answer].remove(pick)
                if not by_answer[answer]:
                    del by_answer[answer]
    if max_turns is not None and len(extra) > max_turns - 1:
        extra = rng.sample(extra, max_turns - 1)
    turns = [primary] + extra
    rng.shuffle(turns)
    return tuple(turns)


def vocabulary() -> Tuple[str, ...]:
    """Every word of every question and answer, in a fixed order (first appearance)."""
    words: List[str] = []
    texts = [question_text(k, t) for k in KINDS for t in TARGETS[k]]
    for text in texts + [a for k in KINDS for a in ANSWERS[k]]:
        for w in text.split():
            if w not in words:
                words.append(w)
    return tuple(words)
