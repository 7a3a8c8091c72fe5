"""Every method on every family the tests can build, under every setting of the stage switches, at batch 1 and 2:
each cell either prunes as configured or is refused by name before the model runs.

What a cell prunes is computed here, from the model's token counts and the config, not read from the plugin:
the visual tokens that reach the language model (a pre-LLM baseline's ``fusion_keep``, or Stage 1's
``encoder_keep`` then Stage 2's ``fusion_keep`` where the model has them) and Stage 3's fixed budget after
``llm_layer``. Forward pre-hooks on every decoder layer's attention module read the sequence it really ran on
(after Stage 3's compaction); the expected lengths are the widest sample's text + row separators + visual
tokens. A cell the family cannot run must raise ``UnsupportedMethodError`` naming the method, the switches and
the class; which cells those are is stated here too (``Case.refused`` and `expected_refusal`), so a family that
starts refusing a cell it ran, or running one it refused, fails.

Each family is built once (module fixtures) and each cell is one forward of a tiny model.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import transformers

import meteor_plugin
from meteor_plugin import adapters
from meteor_plugin.adapters.support import UnsupportedMethodError
from meteor_plugin.compat.transformers import generation
from meteor_plugin.config import METHODS, MeteorConfig

V5 = generation() == "5"
SWITCHES = list(itertools.product([False, True], repeat=3))  # (encoder, fusion, llm)
ENCODER_KEEP, FUSION_KEEP, LLM_KEEP, LLM_LAYER = 0.5, 0.25, 4, 2
PRE_LLM = ("random", "avgpool", "visionzip", "drop_encoder")


def config(method: str, encoder: bool, fusion: bool, llm: bool) -> MeteorConfig:
    return MeteorConfig(method=method, encoder=encoder, fusion=fusion, llm=llm, encoder_keep=ENCODER_KEEP,
                        fusion_keep=FUSION_KEEP, llm_layer=LLM_LAYER, llm_min_keep=LLM_KEEP, llm_max_keep=LLM_KEEP,
                        drop_encoder=0 if method == "drop_encoder" else None)


def share(ratio: float, n: int) -> int:
    kept = ratio * n
    assert kept == int(kept), f"choose budgets that divide the tiny models' token counts ({ratio} x {n})"
    return int(kept)


@dataclass
class Image:
    """One image as the model's vision side sees it: the patch tokens of each encoder input (CLIP inputs: base
    image and crops; EAGLE: each encoder; Qwen: one packed image)."""

    inputs: Sequence[int]
    per_input: bool = True  # budgets apply to each input (LLaVA's crops) or to the image's total (EAGLE)


@dataclass
class Case:
    """One family as the matrix runs it."""

    name: str
    family: str  # adapters' family name
    model: Any
    run: Callable[[int], None]  # a forward of the first ``batch`` samples
    attention: List[torch.nn.Module]  # each decoder layer's attention module
    images: List[List[Image]]  # per sample
    text: List[int]  # per sample: tokens that are not visual (row separators included: never pruned)
    stages: Tuple[str, ...]  # METEOR's stages that prune on this model
    refused: Dict[str, str] = field(default_factory=dict)  # method -> a word its refusal must contain


def visual(case: Case, sample: int, cfg: MeteorConfig) -> int:
    """Visual tokens of ``sample`` that reach the language model under ``cfg``."""
    total = 0
    for image in case.images[sample]:
        counts = list(image.inputs) if image.per_input else [sum(image.inputs)]
        for n in counts:
            if cfg.method in PRE_LLM:
                n = share(FUSION_KEEP, n)
            else:
                if cfg.encoder and "encoder" in case.stages:
                    n = share(ENCODER_KEEP, n)
                if cfg.fusion and "fusion" in case.stages:
                    n = share(FUSION_KEEP, n)
            total += n
    return total


def expected_refusal(case: Case, cfg: MeteorConfig) -> Optional[str]:
    """Why ``case`` must refuse ``cfg`` (a word the error must hold), or None if it must run."""
    if cfg.method in case.refused:
        return case.refused[cfg.method]
    if cfg.method == "fastv" and not cfg.llm:
        return "llm=False"
    asked = [s for s in ("encoder", "fusion", "llm") if getattr(cfg, s)]
    if cfg.method == "meteor" and asked and not any(s in case.stages for s in asked):
        return "unpruned"
    return None


def expected_lengths(case: Case, batch: int, cfg: MeteorConfig) -> List[int]:
    """The sequence length every decoder layer's attention runs on."""
    llm = cfg.llm and "llm" in case.stages
    out = []
    for layer in range(len(case.attention)):
        width = []
        for i in range(batch):
            tokens = LLM_KEEP if llm and layer >= LLM_LAYER else visual(case, i, cfg)
            width.append(case.text[i] + tokens)
        out.append(max(width))
    return out


def attention_lengths(case: Case, batch: int) -> List[List[int]]:
    seen: List[List[int]] = [[] for _ in case.attention]

    def hook(i):
        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i].append(int(hidden.shape[1]))
        return grab

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(case.attention)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. proportional attention unavailable on packed crops
            case.run(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def check_cell(case: Case, batch: int, method: str, switches: Tuple[bool, bool, bool]) -> Optional[str]:
    """None if the cell behaves as stated, else what went wrong."""
    cfg = config(method, *switches)
    refusal = expected_refusal(case, cfg)
    label = f"{method} encoder={switches[0]} fusion={switches[1]} llm={switches[2]}"
    try:
        with meteor_plugin.enabled(cfg):
            seen = attention_lengths(case, batch)
    except UnsupportedMethodError as exc:
        message = str(exc)
        named = [f"method={method!r}", type(case.model).__name__, f"encoder={switches[0]}",
                 f"fusion={switches[1]}", f"llm={switches[2]}"]
        if refusal is None:
            return f"{label}: refused, but it should run ({message})"
        missing = [w for w in named + [refusal] if w not in message]
        return f"{label}: the refusal does not name {missing}: {message}" if missing else None
    except Exception as exc:  # noqa: BLE001 - any other error is a failure of the cell
        return f"{label}: {type(exc).__name__}: {exc}"
    if refusal is not None:
        return f"{label}: ran, but it should be refused ({refusal})"
    want = expected_lengths(case, batch, cfg)
    got = [calls[-1] if calls else None for calls in seen]
    if any(len(calls) != 1 for calls in seen):
        return f"{label}: every layer should run once, got calls {seen}"
    return None if got == want else f"{label}: layers ran on {got} tokens, expected {want}"


# The families ----------------------------------------------------------------------------------------------------
LENGTHS = [(3, 5), (4, 7)]  # text before and after the image, per sample: the second sample is the wider


def _skip_unless(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


def llava_case(merge: str, model_dir: str) -> Case:
    _skip_unless(importlib.util.find_spec("llava") is not None, "the llava package (llava-torch) is not installed")
    from meteor_plugin.adapters.shared import anyres
    from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava, make_batch

    model = build_tiny_llava(TinyLlavaSpec(merge=merge), folder=model_dir)
    ids, mask, images = make_batch(LENGTHS, [True, True])
    if merge == "flat":
        sizes, inputs, newlines = None, [64], [0, 0]
    else:  # LLaVA-1.6: a 64x64 image is a 2x2 crop grid that unpad leaves whole, plus the base image
        images = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        sizes, inputs = [(64, 64), (64, 64)], [64] * 5
        with torch.no_grad():
            out = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images, sizes)
        valid = out[2].bool()
        newlines = [int((anyres.newline_rows(model, out[4])[i] & valid[i]).sum()) for i in range(2)]

    def run(batch):
        extra = {"image_sizes": sizes[:batch]} if sizes else {}
        model(input_ids=ids[:batch], attention_mask=mask[:batch], images=images[:batch], **extra)

    refused = {"drop_encoder": "one vision encoder"}
    return Case(f"llava-{'1.5' if merge == 'flat' else '1.6'}", "llava", model, run,
                [layer.self_attn for layer in model.get_model().layers],
                [[Image(inputs)] for _ in range(2)], [sum(n) + r for n, r in zip(LENGTHS, newlines)],
                ("encoder", "llm"), refused)


def eagle_case(converted: bool) -> Case:
    from meteor_plugin.adapters.eagle import convert_to_post_projection
    from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle, default_tower_configs
    from meteor_plugin.testing.llava import make_batch

    towers = default_tower_configs()  # two encoders at a small input: 8x8 tokens each once converted
    towers["clip-448"]["input_image_size"] = 32
    towers["convnext-1024"]["input_image_size"] = 32
    model = build_tiny_eagle(TinyEagleSpec(vision_tower="clip-448;convnext-1024", towers=towers))
    if converted:
        convert_to_post_projection(model)
    ids, mask, images = make_batch(LENGTHS, [True, True], image_size=128)

    def run(batch):
        model(input_ids=ids[:batch], attention_mask=mask[:batch], images=images[:batch])

    if converted:
        image, stages, refused = Image([64, 64], per_input=False), ("encoder", "fusion", "llm"), {}
    else:  # EAGLE's own fusion: every encoder on its 32x32 grid; the encoders only score
        image, stages, refused = Image([1024]), ("fusion", "llm"), {"drop_encoder": "convert"}
    return Case(f"eagle-{'converted' if converted else 'unconverted'}", "eagle", model, run,
                [layer.self_attn for layer in model.get_model().layers], [[image], [image]],
                [sum(n) for n in LENGTHS], stages, refused)


def hf_llava_case(kind: str) -> Case:
    from meteor_plugin.testing.llava import (TinyLlavaSpec, build_tiny_hf_llava, build_tiny_hf_onevision, hf_batch,
                                             hf_image_features, hf_image_newline, hf_language_layers, hf_next_batch)

    if kind == "llava":
        model = build_tiny_hf_llava(TinyLlavaSpec())
        batches = {b: hf_batch(LENGTHS[:b], visual_tokens=64 if V5 else 1) + (None,) for b in (1, 2)}
        inputs, newlines = [64], [0, 0]
    else:
        if kind == "llava-next":
            _skip_unless(hasattr(transformers, "LlavaNextForConditionalGeneration"),
                         f"transformers {transformers.__version__} has no LlavaNextForConditionalGeneration")
            model = build_tiny_hf_llava(TinyLlavaSpec(merge="spatial_unpad"))
            image_sizes = [(64, 64), (64, 64)]  # a 2x2 crop grid that unpad leaves whole, plus the base image
            inputs = [64] * 5
        else:
            _skip_unless(V5, "transformers' LLaVA-OneVision is pruned on transformers 5.x only")
            model = build_tiny_hf_onevision(max_crops=4)
            image_sizes = [(32, 64), (32, 64)]  # a 1x2 crop grid, within anyres_max_4 (not resampled)
            inputs = [64] * 3
        batches = {b: hf_next_batch(model, LENGTHS[:b], image_sizes[:b]) for b in (1, 2)}
        _, _, pixels, sizes = batches[2]
        line = hf_image_newline(model)
        features = hf_image_features(model, pixels, sizes)
        newlines = [int((f == line.view(1, -1)).all(-1).sum()) for f in features]
        assert all(f.shape[0] == sum(inputs) + r for f, r in zip(features, newlines))

    def run(batch):
        ids, mask, pixels, sizes = batches[batch]
        extra = {"image_sizes": sizes} if sizes is not None else {}
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **extra)

    return Case(f"transformers-{kind}", "transformers-llava", model, run,
                [layer.self_attn for layer in hf_language_layers(model)], [[Image(inputs)] for _ in range(2)],
                [sum(n) + r for n, r in zip(LENGTHS, newlines)], ("encoder", "llm"),
                {"drop_encoder": "one vision encoder"})


def qwen_case(kind: str) -> Case:
    from meteor_plugin.testing.qwen_vl import CLASSES, IMAGE_TOKEN, TinyQwenSpec, build_tiny_qwen_vl, qwen_batch

    name = CLASSES[kind] + "ForConditionalGeneration"
    _skip_unless(V5, "the Qwen-VL classes are pruned on transformers 5.x only")
    _skip_unless(hasattr(transformers, name), f"transformers {transformers.__version__} has no {name}")
    model = build_tiny_qwen_vl(TinyQwenSpec(kind=kind))
    samples = [[(3, (1, 8, 8))], [(2, (1, 4, 8)), (1, (1, 8, 4))]]  # 16 tokens; two images of 8
    tail = [5, 7]
    batches = {b: qwen_batch(model, samples[:b], tail[:b]) for b in (1, 2)}
    full = batches[2]
    text = [int((m.bool() & (row != IMAGE_TOKEN)).sum()) for row, m in zip(full["input_ids"], full["attention_mask"])]

    def run(batch):
        model(**batches[batch])

    return Case(f"transformers-{kind}", "transformers-qwen-vl", model, run,
                [layer.self_attn for layer in model.model.language_model.layers],
                [[Image([16])], [Image([8]), Image([8])]], text, ("encoder", "llm"),
                {"drop_encoder": "one vision encoder"})


BUILDERS: Dict[str, Callable[[str], Case]] = {
    "llava-1.5": lambda d: llava_case("flat", d),
    "llava-1.6": lambda d: llava_case("spatial_unpad", d),
    "eagle-unconverted": lambda d: eagle_case(False),
    "eagle-converted": lambda d: eagle_case(True),
    "transformers-llava": lambda d: hf_llava_case("llava"),
    "transformers-llava-next": lambda d: hf_llava_case("llava-next"),
    "transformers-llava-onevision": lambda d: hf_llava_case("llava-onevision"),
    "transformers-qwen2_vl": lambda d: qwen_case("qwen2_vl"),
    "transformers-qwen2_5_vl": lambda d: qwen_case("qwen2_5_vl"),
    "transformers-qwen3_vl": lambda d: qwen_case("qwen3_vl"),
}
FAMILY_OF = {"llava-1.5": "llava", "llava-1.6": "llava", "eagle-unconverted": "eagle", "eagle-converted": "eagle",
             "transformers-llava": "transformers-llava", "transformers-llava-next": "transformers-llava",
             "transformers-llava-onevision": "transformers-llava", "transformers-qwen2_vl": "transformers-qwen-vl",
             "transformers-qwen2_5_vl": "transformers-qwen-vl", "transformers-qwen3_vl": "transformers-qwen-vl"}


@pytest.fixture(scope="module")
def one_thread():
    """A forward of these models is a few small matrix products: a second thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request, model_dir, one_thread):
    torch.manual_seed(0)
    return BUILDERS[request.param](model_dir)


def test_every_family_of_the_registry_is_in_the_matrix():
    """A new family joins the matrix (a builder above) the day it joins the registry."""
    assert sorted(set(FAMILY_OF.values())) == sorted(f.name for f in adapters.FAMILIES)
    assert set(FAMILY_OF) == set(BUILDERS)


@pytest.mark.parametrize("batch", [1, 2])
def test_every_method_and_switch_prunes_as_configured_or_is_refused_by_name(case, batch):
    assert case.family == FAMILY_OF[case.name]
    failures = [problem for method in METHODS for switches in SWITCHES
                if (problem := check_cell(case, batch, method, switches)) is not None]
    assert not failures, f"{case.name}, batch {batch}:\n" + "\n".join(failures)
