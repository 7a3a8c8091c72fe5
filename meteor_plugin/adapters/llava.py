"""The llava package (haotian-liu/LLaVA at c121f04, PyPI ``llava-torch`` 1.2.2): everything the plugin knows
about it. LLaVA-1.5 (flat merge) and LLaVA-1.6 (anyres, ``spatial_unpad``/``spatial``: ``anyres.py``), on
Vicuna/Llama and on Mistral.

- What ``enable()`` patches: the CausalLM and inner model classes (``llava_arch.py``'s wrappers) and the
  CLIP tower, which runs Stage 1 between its blocks. ``CLIPVisionTower.forward``
  (llava/model/multimodal_encoder/clip_encoder.py) runs the HF CLIP with ``output_hidden_states=True``
  and takes ``hidden_states[mm_vision_select_layer]``; the wrapper here prunes between CLIP's blocks
  (``stages/encoder.py``) so that the selected layer already holds only the kept patches; the three
  equal-depth segments count the blocks up to that selected layer.
- What training needs (``TRAINING``): the train module, its Trainer, checkpoint types, the delayed CLIP load.
- What the patcher inserts in a checkout (``PATCHER``), and how its two known versions are told apart.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Optional

import torch

from .. import percall
from ..core.budget import resolve_stage_budget
from ..patcher.codebases import QUANTIZATION_FIX, Layout, main_script
from ..patcher.codebases import Codebase as PatcherCodebase
from ..stages import baselines, proportional
from ..stages.encoder import HF_CLIP_BLOCK, VitPruner, attention_importance
from ..training.codebases import Codebase as TrainingCodebase
from .anyres import is_spatial, spread_to_grid
from .family import Family, require
from .llava_arch import ArchTarget
from .vision import VISION_HANDLERS, EncoderRequest, ImageTokens, VisionRecord, clip_layers, selected_depth

MODEL_MODULE = "llava.model.language_model.llava_llama"
CAUSAL = "LlavaLlamaForCausalLM"


# Stage 1 inside the CLIP tower -----------------------------------------------------------------------------
def wrap_clip_tower_forward(original: Any, registry: Any) -> Any:
    @functools.wraps(original)
    def forward(self, images):
        call = percall.current()
        request: Optional[EncoderRequest] = call.encoder_request if call is not None else None
        if call is not None:
            call.encoder_request = None  # for this forward only
        if request is None or not request.config.encoder:
            return original(self, images)
        if isinstance(images, list):
            return [forward_one(self, image.unsqueeze(0), request) for image in images]
        return forward_one(self, images, request)

    def forward_one(tower, images, request):
        cfg = request.config
        layers = clip_layers(tower.vision_tower)
        depth = selected_depth(len(layers), tower.select_layer)
        patches = tower.num_patches
        keep = resolve_stage_budget("encoder_keep", cfg.encoder_keep, patches)
        pruner = VitPruner.attach(layers, HF_CLIP_BLOCK, registry)
        pruner.start(patches, keep, depth, cfg.encoder_shallow_share, has_cls=True, deep_score=cfg.encoder_deep_score,
                     spread_floor=cfg.spread_floor, track_sizes=proportional.wanted(cfg))
        with pruner.running() as plan:
            features = original(tower, images)
        request.record.stage("encoder").add(patches, keep, plan.positions)
        if proportional.wanted(cfg):
            sizes = plan.sizes if plan.sizes is not None else torch.ones(plan.positions.shape)
            cls = getattr(tower, "select_feature", "patch") == "cls_patch"
            request.record.tokens.extend(ImageTokens.batch(plan.positions, sizes, patches, leading_cls=cls))
        return features

    return forward


def llava_clip_encode(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any):
    """``encode_images`` of a LLaVA model: the CLIP tower runs Stage 1 when handed a request."""
    spatial = is_spatial(model)
    if spatial and cfg.encoder and proportional.wanted(cfg):
        proportional.unavailable(cfg, model, "does not run on LLaVA-1.6's spatial merges (mm_patch_merge_type="
                                 f"{model.config.mm_patch_merge_type!r}) yet")
        cfg = cfg.replace(proportional_attention="off")
    if cfg.method in baselines.PRE_LLM:
        if spatial:
            raise NotImplementedError(
                f"meteor-plugin: the {cfg.method!r} baseline does not run on LLaVA-1.6's spatial merges "
                f"(mm_patch_merge_type={model.config.mm_patch_merge_type!r}); METEOR's stages do")
        return llava_baseline(model, images, cfg, record, original)
    if not cfg.encoder:
        return original(model, images)
    call = percall.current()
    call.encoder_request = EncoderRequest(cfg, record)
    try:
        features = original(model, images)
    finally:
        call.encoder_request = None
    if spatial:  # upstream reshapes full grids: the kept tokens go back to their patch positions
        patches = model.get_model().get_vision_tower().num_patches
        features = spread_to_grid(features, record.stage("encoder").kept[-features.shape[0]:], patches)
    return features


def llava_baseline(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any):
    """A pre-LLM baseline on LLaVA: CLIP unpruned, then ``fusion_keep`` of its projected tokens."""
    tower = model.get_model().get_vision_tower()
    layers = clip_layers(tower.vision_tower)
    depth = selected_depth(len(layers), tower.select_layer)
    features, importance = attention_importance(layers, HF_CLIP_BLOCK, depth - 1, lambda: original(model, images),
                                                has_cls=True)
    if features.shape[1] == importance.shape[1] + 1:  # 'cls_patch' features: CLS ranks first
        importance = torch.cat([torch.ones_like(importance[:, :1]), importance], dim=1)
    keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, features.shape[1])
    kept = baselines.select(cfg.method, [baselines.EncoderTokens(features, importance=importance)], keep, cfg.seed,
                            cfg.drop_encoder)
    record.stage("baseline").add(features.shape[1], kept.shape[1], None, images=features.shape[0], method=cfg.method)
    return kept


def patch_llava_clip(registry: Any) -> None:
    """Stage 1 for LLaVA's CLIP tower (class-level)."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    require(CLIPVisionTower, ("forward", "num_patches", "feature_select"), "LLaVA's CLIPVisionTower")
    if not registry.is_patched(CLIPVisionTower, "forward"):
        registry.patch(CLIPVisionTower, "forward", wrap_clip_tower_forward(CLIPVisionTower.forward, registry))
    VISION_HANDLERS[CLIPVisionTower] = llava_clip_encode


# The record ------------------------------------------------------------------------------------------------
TARGET = ArchTarget(
    name="llava",
    module=MODEL_MODULE,
    causal=CAUSAL,
    llm="LlavaLlamaModel",
    vision=(patch_llava_clip,),
    # llava-v1.6-mistral: the same llava_arch on MistralModel, whose decoder layers are Llama's
    variants=(("llava.model.language_model.llava_mistral", "LlavaMistralForCausalLM", "LlavaMistralModel"),),
    refused={"LlavaMptForCausalLM": "its upstream forward does not run in llava-torch 1.2.2 (MPT's "
                                    "transformers port changed under it), and MPT's blocks are not Llama's"},
)


def _trainable() -> bool:
    return TARGET.is_installed() and importlib.util.find_spec("llava.train") is not None


def _load_delayed_tower(model: Any) -> None:
    """LLaVA builds its CLIP tower with delay_load: its weights come from ``mm_vision_tower`` on load."""
    get_tower = getattr(model, "get_vision_tower", None)
    tower = get_tower() if get_tower else None
    if tower is not None and not getattr(tower, "is_loaded", True):
        tower.load_model()


TRAINING = TrainingCodebase(
    name="llava", keyword="llava",
    model_module=MODEL_MODULE, causal_lm=CAUSAL,
    config_class="LlavaConfig", model_types=("llava_llama", "llava"),
    train_module="llava.train.train", trainer_class="LLaVATrainer", model_global=CAUSAL,
    available=_trainable, after_load=_load_delayed_tower,
    builder_module="llava.model.builder", utils_module="llava.mm_utils",
    # train_mem is upstream's FlashAttention-2 entry
    entry_modules={"llava.train.train_mem": "flash_attention_2", "llava.train.train": "sdpa",
                   "llava.train.train_xformers": "sdpa"},
    title="LLaVA",
    notes={"unavailable": "LLaVA is not installed (pip install --no-deps llava-torch==1.2.2.post1)",
           "install": "pip install --no-deps llava-torch"},
)

C121F04 = Layout("c121f04", "haotian-liu/LLaVA at c121f04", "llava-c121f04.patch")
LLAVA_TORCH = Layout("llava-torch-1.2.2", "llava-torch 1.2.2 (PyPI)", "llava-torch-1.2.2.patch")


def _layout(root: str) -> Optional[Layout]:
    """LLaVA at c121f04 has the S2 vision tower that the llava-torch 1.2.2 wheel lacks."""
    path = os.path.join(root, "llava", "model", "multimodal_encoder", "builder.py")
    try:
        with open(path, encoding="utf-8") as fh:
            has_s2 = "CLIPVisionTowerS2" in fh.read()
    except OSError:
        return None
    return C121F04 if has_s2 else LLAVA_TORCH


PATCHER = PatcherCodebase(
    name="llava",
    title="LLaVA",
    package="llava",
    files=(
        main_script("llava/train/train.py", "training", ("train",), extra=(QUANTIZATION_FIX,)),
        main_script("llava/train/train_mem.py", "training", ("train",)),
        main_script("llava/train/train_xformers.py", "training", ("train",), optional=True),
        main_script("llava/eval/model_vqa_loader.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa_science.py", "evaluation", ("eval_model",)),
        main_script("llava/eval/model_vqa_mmbench.py", "evaluation", ("eval_model",), optional=True),
        main_script("llava/eval/run_llava.py", "evaluation", ("eval_model",)),
        main_script("llava/serve/cli.py", "demo", ("main",)),
        main_script("llava/serve/model_worker.py", "demo", ("ModelWorker",), optional=True),
    ),
    layouts=(C121F04, LLAVA_TORCH),
    recognise=_layout,
)

FAMILY = Family(name="llava", target=TARGET, training=TRAINING, patcher=PATCHER)
