"""EAGLE (NVlabs/EAGLE at fef95f1, not on PyPI): everything the plugin knows about it.

- What ``enable()`` patches (``TARGET``): the CausalLM and inner model classes (``llava_arch.py``'s
  wrappers: EAGLE's ``eagle_arch.py`` is LLaVA's with other names) and the multi-encoder tower below.
- What training needs (``TRAINING``): the root ``train.py``, its Trainer, the ``eagleConfig`` alias its
  LoRA loader imports, and Stage 2's per-encoder projectors (``training/eagle_projectors.py``).
- What the patcher inserts in a checkout (``PATCHER``).
PyPI's ``eagle`` is an unrelated GUI library, so EAGLE is recognised by its model file, not its name.

Stages 1 and 2 for EAGLE's multi-encoder tower (``MultiBackboneChannelConcatenationVisionTower``).

Two ways to run, chosen by ``fusion_mode`` (``auto`` picks by whether the model has been converted):

- ``post_projection`` (converted checkpoints, METEOR's architecture): each encoder runs, Stage 1 keeps
  a rank-guided budget of its tokens (inside the CLIP ViT between blocks; at the output of ConvNeXt,
  SAM/EVA and Pix2Struct, which cannot lose tokens inside), each encoder's own projector (``mm_projectors``)
  maps them to the LLM width, the tokens are joined along the sequence and Stage 2 keeps the
  ``fusion_keep`` least redundant across encoders. EAGLE's channel concatenation is bypassed.
- ``training_free`` (unconverted checkpoints): EAGLE's tower runs as is (channel concatenation on the
  32x32 grid); the fusion stage keeps the ``fusion_keep`` grid positions with the best rank-weighted sum of
  each encoder's score, then the shared projector runs on them. Nothing is dropped inside an encoder
  here (all encoders must describe the same positions), so the encoder stage only scores.

Which EAGLE encoder is pruned where, and why: ``clip-448`` (HRCLIP) between its blocks, by received
attention at the deep boundary since EAGLE drops its CLS before the blocks; ``convnext-1024`` (a CNN:
dropping tokens saves nothing), ``sam-1024`` and ``det-1024`` (windowed attention and full-grid relative
positions / RoPE) and ``pix2struct-1024`` (its post-processing hard-codes its grid) at their output.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.budget import cap_budgets, rank_budgets, resolve_stage_budget
from ..core.select import gather_tokens
from ..core.token_sizes import kept_sizes
from ..registry import REGISTRY
from ..stages import baselines, proportional
from ..stages.encoder import HF_CLIP_BLOCK, VitPruner, attention_importance, prune_output
from ..stages.fusion import cooperative_prune, empty_projectors, rank_weighted_positions, split_projector
from ..patcher.anchors import AfterClass, AfterImportsBefore, class_named, statement_calling
from ..patcher.codebases import QUANTIZATION_FIX, Layout, enable_edit, main_script
from ..patcher.codebases import Codebase as PatcherCodebase
from ..patcher.edits import Edit, FileSpec
from ..training.codebases import Codebase as TrainingCodebase
from .family import Family, require
from .llava_arch import ArchTarget
from .vision import VISION_HANDLERS, ImageTokens, VisionRecord, clip_layers

MODEL_MODULE = "eagle.model.language_model.eagle_llama"
CAUSAL = "EagleLlamaForCausalLM"

KNOWN_ENCODERS = ("clip-448", "convnext-1024", "sam-1024", "det-1024", "pix2struct-1024")
# Channels each encoder adds to the fused features (NVlabs/EAGLE fef95f1): CLIP-L, ConvNeXt-XXL's last
# stage, SAM-L after pixel_unshuffle, EVA-02-L, Pix2Struct-large.
ENCODER_CHANNELS = {"clip-448": 1024, "convnext-1024": 3072, "sam-1024": 1024, "det-1024": 1024,
                    "pix2struct-1024": 1536}
PRUNED_INSIDE = ("HRCLIPVisionTower",)  # ViT towers whose block loop runs Stage 1 between blocks
FUSION_KEY = "meteor_fusion"  # model config entry written by the conversion


_WARNED_RANKS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models already told: once per model, not per call


class FusionConfigError(ValueError):
    pass


def encoder_names(model: Any) -> List[str]:
    """Encoder names in tower order (EAGLE skips unknown names when it builds the towers)."""
    towers = model.get_model().get_vision_tower().vision_towers
    names = [n for n in str(getattr(model.config, "mm_vision_tower", "")).split(";") if n in KNOWN_ENCODERS]
    return names if len(names) == len(towers) else [type(t).__name__ for t in towers]


def is_converted(model: Any) -> bool:
    return getattr(model.get_model(), "mm_projectors", None) is not None


def resolve_mode(model: Any, cfg: Any) -> str:
    converted = is_converted(model)
    if getattr(model.config, FUSION_KEY, None) and not converted:
        raise FusionConfigError(
            "this checkpoint was converted to METEOR's post-projection fusion, but its per-encoder projectors "
            "(mm_projectors) were not built: enable meteor-plugin before loading the model"
        )
    if cfg.fusion_mode == "auto":
        return _check_similarity("post_projection" if converted else "training_free", cfg)
    if cfg.fusion_mode == "post_projection" and not converted:
        raise FusionConfigError(
            "MeteorConfig.fusion_mode='post_projection' needs per-encoder projectors: convert the checkpoint "
            "(meteor-plugin convert) or call meteor_plugin.adapters.eagle.convert_to_post_projection(model); "
            "allowed for an unconverted model: 'training_free' or 'auto'"
        )
    if cfg.fusion_mode == "training_free" and converted:
        raise FusionConfigError(
            "MeteorConfig.fusion_mode='training_free' keeps EAGLE's channel concatenation, but this model was "
            "converted to per-encoder projectors: allowed here 'post_projection' or 'auto'"
        )
    return _check_similarity(cfg.fusion_mode, cfg)


def _check_similarity(mode: str, cfg: Any) -> str:
    default = cfg.default_of("fusion_similarity")
    if mode == "training_free" and cfg.fusion and cfg.fusion_similarity != default:
        raise FusionConfigError(
            f"MeteorConfig.fusion_similarity={cfg.fusion_similarity!r} applies to post-projection fusion, but this "
            "model fuses EAGLE's way (training-free mode scores grid positions, not cross-encoder similarity): "
            f"convert it (meteor-plugin convert) or leave fusion_similarity at its default {default!r}"
        )
    if mode == "training_free" and cfg.fusion and cfg.fusion_quota != "none":
        raise FusionConfigError(
            f"MeteorConfig.fusion_quota={cfg.fusion_quota!r} applies to post-projection fusion, but this model fuses "
            "EAGLE's way (training-free mode keeps grid positions that every encoder shares, so there are no "
            "per-encoder shares): convert it (meteor-plugin convert) or leave fusion_quota at 'none'"
        )
    return mode


def _tower_input(mbcc: Any, tower: Any, images: torch.Tensor) -> torch.Tensor:
    """The resize EAGLE's tower applies when an encoder's input size differs from the fused input."""
    size = getattr(tower, "input_image_size", None)
    if size is None or size == images.shape[-1]:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=True).to(images.dtype)


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """An encoder output as (B, N, C): maps (B, C, H, W) are flattened row by row."""
    return feature if feature.dim() == 3 else feature.flatten(2).transpose(1, 2)


def _project(projector: Any, tokens: torch.Tensor) -> torch.Tensor:
    """An encoder's tokens through its projector, in the projector's dtype: upstream training casts the
    towers to float16 without --bf16 while the projectors stay float32 (EAGLE's channel concatenation
    promotes the dtypes; one encoder's output alone is not promoted)."""
    dtype = next(projector.parameters()).dtype
    return projector(tokens if tokens.dtype == dtype else tokens.to(dtype))


def _ranks(cfg: Any, names: Sequence[str], model: Any) -> List[Optional[float]]:
    ranks = [cfg.encoder_ranks.get(n) if cfg.encoder_ranks else None for n in names]
    missing = [n for n, r in zip(names, ranks) if r is None]
    if missing and model not in _WARNED_RANKS:
        _WARNED_RANKS.add(model)
        warnings.warn(
            f"meteor-plugin Stage 1: no encoder_ranks for {', '.join(missing)}; the token budget is split "
            "uniformly across encoders. Run `meteor-plugin calibrate` to split it by rank as METEOR does.",
            stacklevel=4,
        )
    return ranks


def encode_post_projection(model: Any, images: torch.Tensor, cfg: Any, record: VisionRecord) -> torch.Tensor:
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    towers = list(mbcc.vision_towers)
    names = encoder_names(model)
    # Encoders pruned at their output run first: their token counts are only known from the output.
    outputs: Dict[int, torch.Tensor] = {}
    for i, tower in enumerate(towers):
        if type(tower).__name__ not in PRUNED_INSIDE:
            outputs[i] = _tokens(tower(_tower_input(mbcc, tower, images)))
    counts = [outputs[i].shape[1] if i in outputs else int(t.num_patches) for i, t in enumerate(towers)]
    if cfg.encoder:
        total = resolve_stage_budget("encoder_keep", cfg.encoder_keep, sum(counts))
        budgets = cap_budgets(rank_budgets(total, _ranks(cfg, names, model)), counts)
    else:
        budgets = list(counts)
    features, owners, positions = [], [], {}
    b = images.shape[0]
    track = proportional.wanted(cfg)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    where, sizes = [], []  # with proportional_attention: each kept token's place among all, and its size
    for i, tower in enumerate(towers):
        if budgets[i] == 0:
            continue  # an encoder without budget is not run at all
        size = None
        if i in outputs:
            kept, index = prune_output(outputs[i], budgets[i], cfg.spread_floor)
            if track:
                size = kept_sizes(outputs[i], index)
        else:
            layers = clip_layers(tower.vision_tower)
            pruner = VitPruner.attach(layers, HF_CLIP_BLOCK, REGISTRY)
            plan = pruner.start(counts[i], budgets[i], len(layers), cfg.encoder_shallow_share, has_cls=False,
                                deep_score=cfg.encoder_deep_score, spread_floor=cfg.spread_floor, track_sizes=track)
            with pruner.running():
                kept = _tokens(tower(_tower_input(mbcc, tower, images)))
            index = plan.positions if plan.positions is not None else torch.arange(counts[i]).expand(b, -1)
            size = plan.sizes
        positions[names[i]] = index
        features.append(_project(llm.mm_projectors[i], kept))
        owners.append(torch.full((kept.shape[1],), i, dtype=torch.long))
        if track:
            where.append(index.to(kept.device) + offsets[i])
            sizes.append(size if size is not None else torch.ones(index.shape, device=kept.device))
    z = torch.cat(features, dim=1)
    owner = torch.cat(owners)
    per_encoder = {n: [c, k] for n, c, k in zip(names, counts, budgets)}
    # Per image, the grid position (row-major in that encoder's own grid) of each token Stage 1 kept, in the
    # order the tokens reach Stage 2: what the fusion stage's and Stage 3's kept indices point into.
    kept_at = [{"positions": {n: pos[j].tolist() for n, pos in positions.items()}} for j in range(b)]
    record.stage("encoder").add(sum(counts), z.shape[1], None, images=b, per_image=kept_at, per_encoder=per_encoder)
    if track:
        where, sizes = torch.cat(where, dim=1), torch.cat(sizes, dim=1)
    if cfg.fusion:
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, z.shape[1])
        entering = z.shape[1]
        quota = None
        if cfg.fusion_quota == "rank":  # the encoders that reach Stage 2 (one without budget never ran)
            quota = [r for r, n in zip(_ranks(cfg, names, model), budgets) if n > 0]
        before = z
        z, index = cooperative_prune(z, owner, keep, cfg.fusion_similarity, cfg.spread_floor, quota)
        survivors = owner.to(index.device)[index]  # (B, keep)
        record.stage("fusion").add(entering, z.shape[1], index, per_image=[
            {"per_encoder": {n: int((s == i).sum()) for i, n in enumerate(names)}} for s in survivors])
        if track:
            sizes = kept_sizes(before, index, sizes, group=owner)
            where = torch.gather(where, 1, index.to(where.device))
    if track:
        record.tokens.extend(ImageTokens.batch(where, sizes, sum(counts)))
    return z


def encode_training_free(model: Any, images: torch.Tensor, cfg: Any, record: VisionRecord) -> torch.Tensor:
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    fused = mbcc(images)  # (B, 1024, sum of channels): EAGLE's own fusion, untouched
    b, n, _ = fused.shape
    names = encoder_names(model)
    record.stage("encoder").add(n, n, None, images=b, mode="training_free: encoders score, the fusion stage selects")
    if cfg.fusion:
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, n)
        slices, start = [], 0
        for tower in mbcc.vision_towers:
            slices.append(fused[..., start:start + tower.hidden_size])
            start += tower.hidden_size
        index = rank_weighted_positions(slices, _ranks(cfg, names, model), keep, cfg.spread_floor)
        fused = gather_tokens(fused, index)
        record.stage("fusion").add(n, keep, index)
    return llm.mm_projector(fused)


def encode_baseline(model: Any, images: torch.Tensor, cfg: Any, record: VisionRecord, mode: str) -> torch.Tensor:
    """A pre-LLM baseline: every encoder unpruned, then ``fusion_keep`` of the projected tokens."""
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    if mode == "post_projection":
        encoders = []
        for i, tower in enumerate(mbcc.vision_towers):
            run = lambda tower=tower: tower(_tower_input(mbcc, tower, images))  # noqa: E731
            importance = None
            if type(tower).__name__ in PRUNED_INSIDE:
                layers = clip_layers(tower.vision_tower)
                out, importance = attention_importance(layers, HF_CLIP_BLOCK, len(layers) - 1, run, has_cls=False)
            else:
                out = run()
            tokens = _tokens(out)
            encoders.append(baselines.EncoderTokens(_project(llm.mm_projectors[i], tokens), grid=int(tokens.shape[1] ** 0.5),
                                                    importance=importance))
    else:
        if cfg.method == "drop_encoder":
            raise FusionConfigError("method='drop_encoder' needs per-encoder projectors: convert the checkpoint first")
        fused = llm.mm_projector(mbcc(images))
        encoders = [baselines.EncoderTokens(fused, grid=int(fused.shape[1] ** 0.5))]
    total = sum(e.tokens.shape[1] for e in encoders)
    keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, total)
    kept = baselines.select(cfg.method, encoders, keep, cfg.seed, cfg.drop_encoder)
    record.stage("baseline").add(total, kept.shape[1], None, images=images.shape[0], method=cfg.method)
    return kept


def encode_images(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any) -> torch.Tensor:
    """``encode_images`` of an EAGLE model while the plugin is enabled."""
    mode = resolve_mode(model, cfg)
    if not torch.is_tensor(images) or images.dim() != 4:
        raise NotImplementedError("meteor-plugin's EAGLE stages take a (B, 3, H, W) image batch")
    if cfg.method in baselines.PRE_LLM:
        return encode_baseline(model, images, cfg, record, mode)
    if mode == "post_projection":
        return encode_post_projection(model, images, cfg, record)
    if cfg.encoder or cfg.fusion:
        if proportional.wanted(cfg):
            proportional.unavailable(cfg, model, "needs the tokens each encoder keeps, and this model fuses EAGLE's "
                                     "way (shared grid positions): convert it with meteor-plugin convert")
        return encode_training_free(model, images, cfg, record)
    return original(model, images)


# Conversion to post-projection fusion -------------------------------------------------------------------
def tower_channels(model: Any) -> List[int]:
    return [int(t.hidden_size) for t in model.get_model().get_vision_tower().vision_towers]


def fusion_record(encoders: Sequence[str], channels: Sequence[int], projector_type: str) -> Dict[str, Any]:
    """What ``config.meteor_fusion`` holds for a converted model (``wrap_llm_init`` rebuilds from it)."""
    return {"mode": "post_projection", "encoders": list(encoders), "channels": [int(c) for c in channels],
            "projector_type": projector_type}


def convert_to_post_projection(model: Any, source: Any = None) -> None:
    """Give a loaded EAGLE model per-encoder projectors split from its shared one (in place).

    Records the conversion in ``model.config.meteor_fusion`` so that a saved checkpoint rebuilds them
    when it is loaded with the plugin enabled. ``source`` is the module to split when it is not the
    model's own ``mm_projector`` (training passes a gathered copy of a ZeRO-3-partitioned one).
    """
    llm = model.get_model()
    if is_converted(model):
        raise FusionConfigError("this model already has per-encoder projectors (mm_projectors): it was converted")
    channels = tower_channels(model)
    llm.mm_projectors = split_projector(llm.mm_projector if source is None else source, channels)
    setattr(model.config, FUSION_KEY, fusion_record(
        encoder_names(model), channels, getattr(model.config, "mm_projector_type", "linear")))


def built_tower_channels(config_fields: Dict[str, Any]) -> List[int]:
    """The channels of each tower the installed ``eagle`` package builds from a checkpoint's config
    (ImportError without one): for encoders whose sizes are not EAGLE's own."""
    from eagle.model.multimodal_encoder.builder import build_vision_tower

    _, config_class = TRAINING.classes()
    tower = build_vision_tower(config_class(**config_fields))
    return [int(t.hidden_size) for t in tower.vision_towers]


def wrap_llm_init(original: Any) -> Any:
    """``EagleLlamaModel.__init__``: build the per-encoder projectors of a converted checkpoint, so that
    ``from_pretrained`` fills them from the saved weights like any other module."""
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        spec = getattr(config, FUSION_KEY, None)
        if spec and getattr(self, "mm_projector", None) is not None:
            self.mm_projectors = empty_projectors(spec["channels"], config.hidden_size, spec["projector_type"])

    return __init__


def patch_eagle_vision(registry: Any) -> None:
    from eagle.model.language_model.eagle_llama import EagleLlamaModel
    from eagle.model.multimodal_encoder.multi_backbone_channel_concatenation_encoder import (
        MultiBackboneChannelConcatenationVisionTower,
    )

    require(MultiBackboneChannelConcatenationVisionTower, ("forward",), "EAGLE's MultiBackboneChannelConcatenationVisionTower")
    if not registry.is_patched(EagleLlamaModel, "__init__"):
        registry.patch(EagleLlamaModel, "__init__", wrap_llm_init(EagleLlamaModel.__init__))
    VISION_HANDLERS[MultiBackboneChannelConcatenationVisionTower] = encode_images


# The record ------------------------------------------------------------------------------------------------
TARGET = ArchTarget(name="eagle", module=MODEL_MODULE, causal=CAUSAL, llm="EagleLlamaModel",
                    vision=(patch_eagle_vision,))


def alias_eagle_config(train_module: Any = None, llama_module: Optional[Any] = None) -> bool:
    """Give ``eagle_llama`` the ``eagleConfig`` name its LoRA loader imports; True if it was missing.

    ``eagle/model/builder.py``'s LoRA branch does ``from eagle.model.language_model.eagle_llama import
    eagleConfig``; the class is ``EagleConfig`` (ImportError). ``train_module`` is unused (the signature of
    a codebase runtime fix); ``llama_module`` defaults to the installed ``eagle_llama``. Recorded in the
    patch registry, so ``meteor_plugin.disable()`` removes it again. The patched tree carries it as a
    source edit too (``EAGLE_CONFIG_ALIAS``); both together are harmless.
    """
    module = llama_module if llama_module is not None else importlib.import_module(MODEL_MODULE)
    if not hasattr(module, "EagleConfig"):
        raise AttributeError(f"{module.__name__} has no EagleConfig: not EAGLE's eagle_llama.py")
    if hasattr(module, "eagleConfig"):
        return False
    REGISTRY.patch(module, "eagleConfig", module.EagleConfig)
    return True


def eagle_train_script() -> Optional[str]:
    """The path of an importable root ``train.py`` with EAGLE's structure, or None.

    Read as text, not imported (importing it builds nothing but pulls in all of EAGLE). Our own
    ``meteor_plugin/train.py`` never counts, in case it was run as a script from its folder.
    """
    spec = importlib.util.find_spec("train") if importlib.util.find_spec("eagle") is not None else None
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return None
    if os.path.dirname(os.path.abspath(origin)) == os.path.dirname(os.path.dirname(os.path.abspath(__file__))):
        return None
    with open(origin, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    needed = ("def train(", "EagleTrainer", "class ModelArguments", "safe_save_model_for_hf_trainer")
    return origin if all(n in text for n in needed) else None


def _trainable() -> bool:
    return TARGET.is_installed() and eagle_train_script() is not None


TRAINING = TrainingCodebase(
    name="eagle", keyword="eagle",
    model_module=MODEL_MODULE, causal_lm=CAUSAL,
    config_class="EagleConfig", model_types=("eagle_llama",),
    train_module="train", trainer_class="EagleTrainer", model_global=CAUSAL,
    available=_trainable, runtime_fixes=(alias_eagle_config,),
    # Stage 2's per-encoder projectors (eagle_projectors.py): added by convert, or split before training.
    convert_weights="meteor_plugin.training.eagle_projectors:convert_weights",
    weights_required=True,
    weights_missing_reason="converting an EAGLE checkpoint needs the per-encoder projectors of METEOR's Stage 2",
    before_training="meteor_plugin.training.eagle_projectors:before_training",
    # EAGLE trains every encoder (freeze_vision=False) and the projector: so do its LoRA runs, beside the adapters.
    fully_trained=("mm_projector", "vision_tower"),
    # transformers 4.44 skips a module only if "<name>." is in its path: "mm_projector" misses mm_projectors.N.
    keep_unquantised=("mm_projectors",),
    builder_module="eagle.model.builder", utils_module="eagle.mm_utils",
    entry_modules={"train_mem": "flash_attention_2", "train": "sdpa"},
    from_checkout=True,
    title="EAGLE",
    notes={"unavailable": "run from the root of an EAGLE checkout: its train.py and eagle/ must be importable",
           "install": "put an NVlabs/EAGLE checkout on PYTHONPATH"},
)

EAGLE_CONFIG_ALIAS = Edit(
    name="eagleConfig-alias",
    anchor=AfterClass("EagleConfig"),
    code=("eagleConfig = EagleConfig  # [METEOR] the LoRA branch of eagle/model/builder.py imports this misspelt name",),
    why="LoRA checkpoints: builder.py imports `eagleConfig`, which did not exist (ImportError)",
)

PATCHER = PatcherCodebase(
    name="eagle",
    title="EAGLE",
    package="eagle",
    files=(
        main_script("train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        main_script("train_mem.py", "training", ("train",)),
        main_script("eagle/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        main_script("eagle/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        main_script("eagle/eval/model_vqa_mmmu.py", "evaluation", ("main",), optional=True),
        main_script("eagle/eval/run_eagle.py", "evaluation", ("eval_model",)),
        FileSpec("lmms_eval/models/eagle.py", "evaluation",
                 (enable_edit(AfterImportsBefore("`class Eagle`", class_named("Eagle")), loud=True),)),
        FileSpec("predict_demo.py", "demo",
                 (enable_edit(AfterImportsBefore("the call to load_pretrained_model()",
                                                 statement_calling("load_pretrained_model"))),)),
        FileSpec("gradio_demo.py", "demo",
                 (enable_edit(AfterImportsBefore("the argument parsing or model loading",
                                                 statement_calling("parse_args", "load_pretrained_model"))),),
                 optional=True),
        FileSpec("eagle/model/language_model/eagle_llama.py", "fix", (EAGLE_CONFIG_ALIAS,)),
    ),
    layouts=(Layout("fef95f1", "NVlabs/EAGLE at fef95f1", "eagle-fef95f1.patch"),),
)

FAMILY = Family(name="eagle", target=TARGET, training=TRAINING, patcher=PATCHER)
