"""A tiny LLaVA (CLIP tower + projector + Llama) with random weights, built without the model hub.

LLaVA's CLIP tower loads from a path, so the tiny CLIP is saved to a folder first (as in stack.md).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .llm import TinyLlm, llm_config_kwargs

IMAGE_TOKEN_INDEX = -200


@dataclass
class TinyLlavaSpec(TinyLlm):
    image_size: int = 32
    patch_size: int = 4  # (32 / 4)^2 = 64 visual tokens
    vision_hidden: int = 32
    vision_layers: int = 4  # select layer -2 leaves 3 blocks: one per Stage 1 segment
    vision_heads: int = 2
    vision_intermediate: Optional[int] = None  # CLIP's MLP width (None: twice vision_hidden; CLIP-L's is 4x)
    language: str = "llama"  # or "mistral": LlavaMistralForCausalLM, llava-v1.6-mistral's class
    merge: str = "flat"  # LLaVA-1.5; "spatial_unpad" (or "spatial") with anyres images: LLaVA-1.6

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def save_tiny_clip(folder: str, spec: TinyLlavaSpec) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(spec.seed)
    config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    ).save_pretrained(folder)
    return folder


# language -> (module, config class, causal class) in the llava package
LANGUAGES = {
    "llama": ("llava.model.language_model.llava_llama", "LlavaConfig", "LlavaLlamaForCausalLM"),
    "mistral": ("llava.model.language_model.llava_mistral", "LlavaMistralConfig", "LlavaMistralForCausalLM"),
}


def _classes(spec: TinyLlavaSpec):
    import importlib

    if spec.language not in LANGUAGES:
        raise ValueError(f"language={spec.language!r} is invalid: allowed {', '.join(LANGUAGES)}")
    module, config_cls, causal_cls = LANGUAGES[spec.language]
    module = importlib.import_module(module)
    return getattr(module, config_cls), getattr(module, causal_cls)


def tiny_llava_config(vision_folder: str, spec: TinyLlavaSpec):
    config_cls, _ = _classes(spec)
    extra = {"sliding_window": None} if spec.language == "mistral" else {}  # as llava-v1.6-mistral's base
    config = config_cls(**extra,
        **llm_config_kwargs(spec),
        mm_vision_tower=vision_folder, mm_hidden_size=spec.vision_hidden, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type=spec.merge,
        image_aspect_ratio="square" if spec.merge == "flat" else "anyres", use_mm_proj=True,
    )
    if spec.merge != "flat":  # LLaVA-1.6's grids, at the tiny CLIP's size: 1x2, 2x1 and 2x2 crops
        s = spec.image_size
        config.image_grid_pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config._attn_implementation = spec.attn_implementation
    return config


def build_tiny_llava(spec: Optional[TinyLlavaSpec] = None, folder: Optional[str] = None):
    """A LlavaLlamaForCausalLM (or ``spec.language``'s class) in eval mode with seeded random weights."""
    spec = spec or TinyLlavaSpec()
    _, causal_cls = _classes(spec)
    folder = folder or tempfile.mkdtemp(prefix="meteor-tiny-clip-")
    vision = os.path.join(folder, "clip-{}-{}-{}-{}-{}-{}".format(
        spec.image_size, spec.patch_size, spec.vision_hidden, spec.vision_layers, spec.vision_heads, spec.seed)
        + (f"-mlp{spec.vision_intermediate}" if spec.vision_intermediate else ""))
    if not os.path.isdir(vision):
        save_tiny_clip(vision, spec)
    config = tiny_llava_config(vision, spec)
    torch.manual_seed(spec.seed + 1)
    model = causal_cls(config)
    model.get_vision_tower().load_model()
    newline = getattr(model.get_model(), "image_newline", None)
    if newline is not None:  # upstream leaves it uninitialised (torch.empty) for checkpoints to fill
        with torch.no_grad():
            newline.copy_(torch.randn(newline.shape, generator=torch.Generator().manual_seed(spec.seed + 2)))
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_batch(
    text_lengths: Sequence[Tuple[int, int]],
    with_image: Sequence[bool],
    pad_side: str = "right",
    vocab_size: int = 256,
    image_size: int = 32,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (with IMAGE_TOKEN_INDEX), attention_mask and images for a padded batch.

    text_lengths[i] = (tokens before the image, tokens after it). Token ids avoid 0-2 (pad, bos, eos).
    """
    g = torch.Generator().manual_seed(seed)
    rows: List[torch.Tensor] = []
    for (before, after), image in zip(text_lengths, with_image):
        ids = torch.randint(3, vocab_size, (before + after,), generator=g)
        if image:
            ids = torch.cat([ids[:before], torch.tensor([IMAGE_TOKEN_INDEX]), ids[before:]])
        rows.append(ids)
    width = max(r.shape[0] for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if pad_side == "left":
            input_ids[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        else:
            input_ids[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
    images = torch.randn(len(rows), 3, image_size, image_size, generator=g)
    return input_ids, mask, images


HF_IMAGE_TOKEN = 255  # the tiny transformers LLaVA's image token: the last id of its vocabulary


def build_tiny_hf_llava(spec: Optional[TinyLlavaSpec] = None, tower: str = "clip"):
    """transformers' own LlavaForConditionalGeneration (as llava-hf checkpoints load), or with
    ``spec.merge != "flat"`` its LlavaNextForConditionalGeneration, tiny, seeded, eval mode.

    The same sizes as ``build_tiny_llava``; its prompts hold one ``HF_IMAGE_TOKEN`` per visual token
    (``hf_batch``), as the processor writes them on transformers 5. ``tower="siglip"``: a SigLIP tower (no
    CLS, ``vision_feature_select_strategy="full"``, as llava-interleave's), with as many visual tokens.
    """
    import transformers

    spec = spec or TinyLlavaSpec()
    name = "Llava" if spec.merge == "flat" else "LlavaNext"  # LLaVA-NeXT: anyres crops, unpad, newlines
    text = llm_config_kwargs(spec)
    padding_side = text.pop("tokenizer_padding_side")
    extra = {} if spec.merge == "flat" else {"image_grid_pinpoints": [[spec.image_size, 2 * spec.image_size],
                                                                      [2 * spec.image_size, spec.image_size],
                                                                      [2 * spec.image_size, 2 * spec.image_size]]}
    config = getattr(transformers, name + "Config")(**extra,
        vision_config=dict(model_type=f"{tower}_vision_model", hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size),
        text_config=dict(model_type=spec.language, **text), image_token_index=HF_IMAGE_TOKEN,
        image_seq_length=spec.visual_tokens, vision_feature_layer=-2,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
    )
    config.text_config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed + 1)
    model = getattr(transformers, name + "ForConditionalGeneration")(config).eval()
    with torch.no_grad():  # a trained pad row, not padding_idx's zeros: 4.x's merge takes zero rows for image slots
        model.get_input_embeddings().weight[0].normal_(0.0, 0.02, generator=torch.Generator().manual_seed(spec.seed))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.padding_side = padding_side
    return model


def build_tiny_hf_onevision(spec: Optional[TinyLlavaSpec] = None, max_crops: int = 1):
    """transformers' LlavaOnevisionForConditionalGeneration, tiny, seeded, eval mode: a SigLIP tower (no CLS,
    every patch a token), a Qwen2 language model (``spec.language`` unless it is the default llama), the
    anyres grids of ``build_tiny_hf_llava``'s LLaVA-NeXT, and ``anyres_max_{max_crops}``: with the default 1,
    a 2x2 crop grid (16x16 patches) is interpolated down to about 8x8 before its row separators go in.
    Prompts as for LLaVA-NeXT (``hf_next_batch``)."""
    import transformers

    spec = spec or TinyLlavaSpec(language="qwen2")
    text = llm_config_kwargs(spec)
    padding_side = text.pop("tokenizer_padding_side")
    size = spec.image_size
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden,
                           intermediate_size=spec.vision_hidden * 2, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.vision_heads, image_size=size, patch_size=spec.patch_size),
        text_config=dict(model_type="qwen2" if spec.language == "llama" else spec.language, **text),
        image_token_index=HF_IMAGE_TOKEN, video_token_index=HF_IMAGE_TOKEN - 1, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=f"anyres_max_{max_crops}",
        image_grid_pinpoints=[[size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
    )
    config.text_config._attn_implementation = spec.attn_implementation
    torch.manual_seed(spec.seed + 1)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.padding_side = padding_side
    return model


def hf_batch(text_lengths: Sequence[Tuple[int, int]], visual_tokens: int = 64, pad_side: str = "left",
             image_size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids with ``visual_tokens`` image tokens per sample (one image each), attention_mask, pixel_values."""
    ids, mask, images = make_batch(text_lengths, [True] * len(text_lengths), pad_side=pad_side, vocab_size=250,
                                   image_size=image_size, seed=seed)
    ids, mask = _expand_image_token(ids, mask, IMAGE_TOKEN_INDEX, [visual_tokens] * len(ids), pad_side)
    return ids, mask, images


def _expand_image_token(ids: torch.Tensor, mask: torch.Tensor, token: int, counts: Sequence[int],
                        pad_side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``token`` replaced by ``counts[i]`` image tokens, rows re-padded on ``pad_side``."""
    rows = []
    for row, m, n in zip(ids, mask, counts):
        real = row[m.bool()].tolist()
        at = real.index(token)
        rows.append(real[:at] + [HF_IMAGE_TOKEN] * n + real[at + 1:])
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if pad_side == "left" else slice(0, len(r))
        out[i, span] = torch.tensor(r)
        out_mask[i, span] = 1
    return out, out_mask


def hf_next_batch(model, text_lengths: Sequence[Tuple[int, int]], sizes: Sequence[Tuple[int, int]],
                  pad_side: str = "left", seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LLaVA-NeXT batch: (input_ids, attention_mask, pixel_values (B, 5, 3, S, S), image_sizes (B, 2) as
    (height, width)), each prompt with as many image tokens as the unpruned model makes of its image (what
    the processor counts). Call it with the plugin disabled."""
    from ..compat.transformers import generation

    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(sizes), 5, 3, size, size, generator=g)
    image_sizes = torch.tensor(sizes)
    # transformers 4.x's processor writes one image token per image (the model splices the features in).
    counts = [f.shape[0] for f in hf_image_features(model, pixels, image_sizes)] if generation() == "5" else [1] * len(
        sizes)
    ids, mask, _ = make_batch(text_lengths, [True] * len(text_lengths), pad_side=pad_side, vocab_size=250, seed=seed)
    ids, mask = _expand_image_token(ids, mask, IMAGE_TOKEN_INDEX, counts, pad_side)
    return ids, mask, pixels, image_sizes


def hf_image_features(model, pixels: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Each image's unpruned features (row separators included) as transformers' LLaVA or LLaVA-NeXT splices
    them, on transformers 5.x or 4.x. Call it with the plugin disabled."""
    from ..adapters.hf_llava import v4 as hf_llava_v4
    from ..compat.transformers import generation
    from ..config import MeteorConfig

    with torch.no_grad():
        if generation() == "5":
            kwargs = {"image_sizes": sizes} if sizes is not None else {}
            return list(model.model.get_image_features(pixels, return_dict=True, **kwargs).pooler_output)
        return hf_llava_v4.encode(model, MeteorConfig(encoder=False), None, pixels, sizes, {})[0]


def hf_image_newline(model) -> Optional[torch.Tensor]:
    """LLaVA-NeXT's row separator (the inner model's on transformers 5.x, the model's own on 4.x)."""
    from ..compat.transformers import generation

    return getattr(model.model if generation() == "5" else model, "image_newline", None)


def hf_language_layers(model):
    """The decoder layers of transformers' LLaVA's language model (5.x: ``model.model.language_model``, a
    decoder; 4.x: ``model.language_model``, a causal LM around one)."""
    from ..compat.transformers import generation

    return (model.model.language_model if generation() == "5" else model.language_model.model).layers


def batch_and_alone(model, generate, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor,
                    sizes: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor, tuple, tuple]]:
    """``generate(model, ids, mask, pixels, sizes)`` (new tokens) on a left-padded batch and on each sample alone,
    unpadded: per sample (its batch row, its tokens alone, (Stage 1, Stage 3) tokens kept in the batch, alone)."""
    from ..stats import stats

    batch = generate(model, ids, mask, pixels, sizes)
    kept = [(s["encoder"].left, s["llm"].left) for s in stats(model).stages]
    out = []
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = generate(model, row, torch.ones_like(row), pixels[i:i + 1], sizes[i:i + 1])
        s = stats(model).stages[0]
        out.append((batch[i:i + 1], alone, kept[i], (s["encoder"].left, s["llm"].left)))
    return out
