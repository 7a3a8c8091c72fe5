"""The fidelity testbed's data: deterministic, right, balanced, and shaped for a LLaVA-style model.

Answers are checked by code written here from the scene description (not by the package's
`answer_for`), and the scene description is checked against the rendered pixels, so a wrong answer
needs the same mistake in three places.
"""

import collections
import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from meteor_plugin.fidelity import (ANSWERS, BACKGROUNDS, COLOURS, IGNORE_INDEX, IMAGE_TOKEN_INDEX, KINDS,
                                    LABEL_GRIDS, SHAPES, FidelityDataset, WordTokenizer, answer_region,
                                    build_llava_batch, iter_batches, make_sample, question_text, render,
                                    token_labels, vocabulary)
from meteor_plugin.fidelity.questions import OBJECTS, TARGETS, generate
from meteor_plugin.fidelity.scenes import (BACKGROUND_RGB, COLOUR_CLASSES, COLOUR_JITTER, COLOUR_RGB, DIGIT_CLASSES,
                                           GAP, GRADIENT, IMAGE_SIZE, NOISE, STRIPES, WHAT_CLASSES)

N = 240  # samples per check: 60 per kind, a multiple of every answer count (4, 6, 10, 4) over 4 kinds


@pytest.fixture(scope="module")
def val_samples():
    return [make_sample("val", i) for i in range(N)]


def _digest(sample):
    return hashlib.sha256(sample.image.numpy().tobytes()).hexdigest()


def _expected_answer(scene, kind, target):
    """The answer from the scene description, written independently of the package."""
    if kind == "background":
        return scene.background
    if kind == "colour":
        found = [o.colour for o in scene.objects if o.shape == target]
        return found[0] if len(found) == 1 else None
    if kind == "count":
        n = len([o for o in scene.objects if o.colour == target])
        return ["zero", "one", "two", "three"][n] if n <= 3 else None
    return None if scene.digit is None else "0123456789"[scene.digit.value]


def _nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(rgb, COLOUR_RGB[c])))


# ---- determinism and splits ---------------------------------------------------------------------------

def test_same_seed_same_bytes_and_different_seed_differs():
    for i in (0, 1, 2, 3, 17):
        a, b = make_sample("train", i, seed=5), make_sample("train", i, seed=5)
        assert torch.equal(a.image, b.image) and a.scene == b.scene and a.turns == b.turns
        assert a.image.dtype == torch.uint8 and a.image.shape == (3, 96, 96)
        c = make_sample("train", i, seed=6)
        assert not torch.equal(a.image, c.image) and a.scene != c.scene
    # a whole batch stream is reproducible too
    x = next(iter_batches("test", 8, seed=1))
    y = next(iter_batches("test", 8, seed=1))
    for key in ("images", "input_ids", "labels", "attention_mask", "token_what"):
        assert torch.equal(x[key], y[key])


def test_splits_are_disjoint(val_samples):
    digests = {split: {_digest(make_sample(split, i)) for i in range(N)} for split in ("train", "test")}
    digests["val"] = {_digest(s) for s in val_samples}
    assert all(len(d) == N for d in digests.values())  # no repeats inside a split either
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_max_turns_does_not_change_the_scene():
    for i in range(8):
        full, single = make_sample("train", i), make_sample("train", i, max_turns=1)
        assert full.scene == single.scene and torch.equal(full.image, single.image)
        assert single.turns == (single.question,) and full.question in full.turns


def test_dataset_indexing():
    ds = FidelityDataset("val", 10, start=5)
    assert len(ds) == 10 and ds[0].index == 5 and ds[-1].index == 14
    assert torch.equal(ds[3].image, make_sample("val", 8).image)
    with pytest.raises(IndexError):
        ds[10]
    digits = FidelityDataset("test", 20, kinds=("digit",), max_turns=1)
    assert [s.question.answer for s in digits] == [str(i % 10) for i in range(20)]
    sizes = [len(b["kinds"]) for b in iter_batches("val", 8, start=3, stop=21)]
    assert sizes == [8, 8, 2]
    with pytest.raises(ValueError, match="max_turns=0"):
        FidelityDataset("val", 4, max_turns=0)


# ---- answers are right ---------------------------------------------------------------------------------

def test_every_answer_matches_the_scene(val_samples):
    for s in val_samples:
        for q in s.turns:
            assert q.answer == _expected_answer(s.scene, q.kind, q.target), (s.index, q)
            assert q.text == question_text(q.kind, q.target)
        assert len({q.kind for q in s.turns}) == len(s.turns)  # one question per kind
        # every kind that the scene can answer is packed
        answerable = {k for k in KINDS if any(_expected_answer(s.scene, k, t) for t in TARGETS[k])}
        assert {q.kind for q in s.turns} == answerable


def test_scene_description_matches_the_pixels(val_samples):
    """Each object's colour is the one its pixels show; things never overlap and lie inside the image at
    positions that follow no grid; the background's tint is the named one, textured."""
    xs = set()
    for s in val_samples[:60]:
        img = s.image.numpy().astype(int)
        assert OBJECTS[0] <= len(s.scene.objects) <= OBJECTS[1]
        boxes = [o.box for o in s.scene.objects] + ([s.scene.digit.box] if s.scene.digit else [])
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 < x0 < x1 < IMAGE_SIZE and 0 < y0 < y1 < IMAGE_SIZE
            xs.add(x0 % 16)
            for a0, b0, a1, b1 in boxes[i + 1:]:
                assert x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0
        for o in s.scene.objects:
            x0, y0, x1, y1 = o.box
            centre = img[:, (y0 + y1) // 2 + 1, (x0 + x1) // 2]  # +1: inside a triangle too
            assert _nearest_colour(centre) == o.colour
            assert np.abs(centre - np.array(COLOUR_RGB[o.colour])).max() <= COLOUR_JITTER + NOISE + 1
        # the background's median is its tint, up to the texture; and the texture is there
        free = np.ones(img.shape[1:], dtype=bool)
        for x0, y0, x1, y1 in boxes:
            free[y0:y1, x0:x1] = False
        tint = np.array(BACKGROUND_RGB[s.scene.background])
        median = np.median(img[:, free], axis=1)
        assert np.abs(median - tint).max() <= GRADIENT + STRIPES
        assert min(BACKGROUNDS, key=lambda b: np.abs(median - BACKGROUND_RGB[b]).sum()) == s.scene.background
        assert img[:, free].std(axis=1).min() > NOISE  # not flat
    assert len(xs) >= 12  # object positions modulo 16 px: no pooling grid lines them up


def test_digit_pixels_lie_in_the_digit_box(val_samples):
    with_digit = [s for s in val_samples if s.scene.digit is not None]
    assert len(with_digit) > N // 2
    for s in with_digit[:40]:
        d = s.scene.digit
        without = render(dataclasses.replace(s.scene, digit=None))  # same texture and noise
        changed = np.argwhere(np.any(without != s.image.numpy(), axis=0))
        assert len(changed) >= 8, "the digit left almost no ink"
        rows, cols = changed[:, 0], changed[:, 1]
        x0, y0, x1, y1 = d.box
        # the digit's ink, and clutter that may fall where the digit and its margin were
        assert rows.min() >= y0 - GAP and rows.max() < y1 + GAP and cols.min() >= x0 - GAP and cols.max() < x1 + GAP
        # the pixels draw the digit the scene names, in the default font: the ink coverage read back
        # from the image (background -> 0, ink -> 1) is the glyph's, up to rounding
        glyph = _glyph(d.value)
        ground = without[:, y0:y1, x0:x1].astype(float)
        coverage = (ground - s.image.numpy()[:, y0:y1, x0:x1]) / (ground - d.ink)
        assert coverage.shape[1:] == glyph.shape
        assert np.median(np.abs(coverage - glyph)) < 0.02 and (np.abs(coverage - glyph) < 0.1).mean() > 0.95


def _glyph(value):
    """Pillow's default font's coverage of ``value`` in [0, 1], cropped to the ink, each pixel drawn as a
    2x2 block (the scenes draw the glyph at twice the font's size)."""
    from PIL import Image, ImageDraw, ImageFont
    canvas = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(canvas).text((8, 8), str(value), fill=255, font=ImageFont.load_default())
    glyph = np.asarray(canvas.crop(canvas.getbbox()), dtype=float) / 255
    return glyph.repeat(2, axis=0).repeat(2, axis=1)


def test_answers_and_kinds_are_balanced(val_samples):
    kinds = collections.Counter(s.kind for s in val_samples)
    assert set(kinds.values()) == {N // len(KINDS)}
    for kind in KINDS:
        got = collections.Counter(s.question.answer for s in val_samples if s.kind == kind)
        assert set(got) == set(ANSWERS[kind])
        assert max(got.values()) - min(got.values()) <= 1, (kind, got)
    # what is not cycled is still spread: the queried shape, the background, the distractor digit (about half)
    shapes = collections.Counter(s.question.target for s in val_samples if s.kind == "colour")
    assert set(shapes) == set(SHAPES) and min(shapes.values()) >= 10
    backgrounds = collections.Counter(s.scene.background for s in val_samples if s.kind != "background")
    assert set(backgrounds) == set(BACKGROUNDS) and min(backgrounds.values()) >= 25
    others = [s for s in val_samples if s.kind != "digit"]
    share = sum(s.scene.digit is not None for s in others) / len(others)
    assert 0.35 < share < 0.65


def test_generate_rejects_bad_arguments():
    import random
    with pytest.raises(ValueError, match="kind='size'"):
        generate("size", "red", random.Random(0))
    with pytest.raises(ValueError, match="answer='four'"):
        generate("count", "four", random.Random(0))
    with pytest.raises(ValueError, match="split='dev'"):
        make_sample("dev", 0)
    with pytest.raises(ValueError, match="index=-1"):
        make_sample("train", -1)


# ---- dense labels ----------------------------------------------------------------------------------------

def test_token_labels_agree_with_the_scene(val_samples):
    """Per encoder grid: each object's centre token is marked once, with the object's shape and colour;
    the digit's tokens hold its value; tokens far from everything are empty."""
    sizes = [g * g for g in LABEL_GRIDS]
    for s in val_samples[:60]:
        labels = {k: v.numpy() for k, v in s.token_labels.items()}
        assert all(v.shape == (sum(sizes),) for v in labels.values())
        offset = 0
        for grid, size in zip(LABEL_GRIDS, sizes):
            what, colour, digit, centre = (labels[k][offset:offset + size].reshape(grid, grid)
                                           for k in ("what", "colour", "digit", "centre"))
            patch = IMAGE_SIZE // grid
            assert centre.sum() == len(s.scene.objects)
            for o in s.scene.objects:
                r, c = int((o.box[1] + o.box[3]) / 2 // patch), int((o.box[0] + o.box[2]) / 2 // patch)
                assert centre[r, c] == 1
                assert (WHAT_CLASSES[what[r, c]], COLOUR_CLASSES[colour[r, c]]) == (o.shape, o.colour)
            if s.scene.digit is not None:
                values = {DIGIT_CLASSES[v] for v in digit[digit > 0]}
                assert values == {str(s.scene.digit.value)}
            else:
                assert not digit.any()
            near = np.zeros((grid, grid), dtype=bool)
            for x0, y0, x1, y1 in [o.box for o in s.scene.objects] + ([s.scene.digit.box] if s.scene.digit else []):
                near[y0 // patch:(y1 - 1) // patch + 1, x0 // patch:(x1 - 1) // patch + 1] = True
            assert not what[~near].any() and not colour[~near].any()
            offset += size
    with pytest.raises(ValueError, match="grid=7"):
        token_labels(val_samples[0].scene, (7,))


def test_answer_region_covers_the_evidence(val_samples):
    for s in val_samples[:40]:
        q = s.question
        region = answer_region(s.scene, q, grid=12)
        if q.kind == "digit":
            x0, y0, x1, y1 = s.scene.digit.box
            assert region[y0 // 8, x0 // 8] and region[(y1 - 1) // 8, (x1 - 1) // 8]
        if q.kind == "background" or (q.kind == "count" and q.answer == "zero"):
            assert not region.any()
        # never more than the tokens of the objects and digit in the scene (at most 3x3 tokens each)
        assert region.sum() <= 9 * (len(s.scene.objects) + 1)


# ---- tokenizer ------------------------------------------------------------------------------------------

def test_tokenizer_round_trips_every_question_and_answer(tmp_path):
    tok = WordTokenizer()
    texts = [question_text(k, t) for k in KINDS for t in TARGETS[k]] + [a for k in KINDS for a in ANSWERS[k]]
    for text in texts:
        ids = tok(text)
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert all(len(tok.encode(a)) == 1 for k in KINDS for a in ANSWERS[k])
    assert tok.vocab[:5] == ("<pad>", "<bos>", "<eos>", "<unk>", "<image>") and len(tok) == 5 + len(vocabulary())
    assert tok.encode("what digit is in the image?") == tok.encode("what digit is in the image ?")
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.vocab == tok.vocab and [loaded(t) for t in texts] == [tok(t) for t in texts]


def test_tokenizer_rejects_unknown_words_unless_asked():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="'hexagon'"):
        tok.encode("what colour is the hexagon ?")
    ids = tok.encode("what colour is the hexagon ?", unknown="unk")
    assert ids[4] == tok.unk_token_id and len(ids) == 6
    assert tok.decode([tok.bos_token_id, IMAGE_TOKEN_INDEX, tok("red")[0]]) == "<bos> <image> red"
    assert tok.decode([tok.bos_token_id, tok("red")[0]], skip_special_tokens=True) == "red"
    with pytest.raises(ValueError, match="id 999"):
        tok.decode([999])


# ---- LLaVA-style batches -----------------------------------------------------------------------------------

def test_batch_marks_the_image_once_and_labels_only_answers():
    tok = WordTokenizer()
    batch = next(iter_batches("train", 16, seed=3, tokenizer=tok))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.dtype == torch.long
    assert batch["images"].shape == (16, 3, 96, 96) and batch["token_what"].shape == (16, sum(g * g for g in LABEL_GRIDS))
    assert ((ids == IMAGE_TOKEN_INDEX).sum(1) == 1).all() and (ids[:, 1] == IMAGE_TOKEN_INDEX).all()
    assert (ids[:, 0] == tok.bos_token_id).all()
    question_mark = tok("?")[0]
    for b, sample in enumerate(batch["samples"]):
        n = int(mask[b].sum())
        assert (mask[b, :n] == 1).all() and (mask[b, n:] == 0).all()  # right padding
        assert (ids[b, n:] == tok.pad_token_id).all()
        answer_pos = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(answer_pos) == len(sample.turns)
        assert torch.equal(labels[b, answer_pos], ids[b, answer_pos])
        assert (ids[b, answer_pos - 1] == question_mark).all()
        assert [tok.decode([i]) for i in ids[b, answer_pos]] == [q.answer for q in sample.turns]
        assert [KINDS[k] for k in batch["label_kinds"][b, answer_pos]] == [q.kind for q in sample.turns]
        assert (batch["label_kinds"][b][labels[b] == IGNORE_INDEX] == -1).all()
        expected = "<bos> <image> " + " ".join(f"{q.text} {q.answer}" for q in sample.turns)
        assert tok.decode(ids[b, :n]) == expected


def test_batch_builder_accepts_pairs_and_rejects_bad_turns():
    tok = WordTokenizer()
    batch = build_llava_batch(tok, [[("what digit is in the image ?", "7")],
                                    [("what colour is the circle ?", "red"), ("how many red objects are there ?", "one")]])
    assert batch["input_ids"].shape == (2, 2 + (6 + 1) + (7 + 1))  # <bos> <image>, then question + answer
    assert batch["attention_mask"][0].tolist() == [1] * (2 + 7 + 1) + [0] * 7
    assert batch["labels"][0, -7:].tolist() == [IGNORE_INDEX] * 7
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 3
    assert (batch["label_kinds"] == -1).all()  # plain pairs carry no kind
    with pytest.raises(ValueError, match="one word"):
        build_llava_batch(tok, [[("what digit is in the image ?", "one two")]])
    with pytest.raises(ValueError, match="turns is empty"):
        build_llava_batch(tok, [[]])
