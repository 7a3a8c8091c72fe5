"""Stage 1: rank-guided token assignment inside each vision encoder.

A ViT's blocks are split into three segments of equal depth; tokens are dropped at the two
boundaries, before the block that starts the next segment:
- shallow boundary: drop the tokens most cosine-similar to the mean token (shallow attention is
  neither sparse nor stable, so similarity is the better redundancy signal);
- deep boundary: keep the tokens with the highest CLS-to-patch attention, computed from that block's
  own q/k (never by asking the model for attention maps); without a CLS token (EAGLE's CLIP drops it),
  the mean attention each token receives. ``encoder_deep_score="similarity"`` scores the deep boundary
  like the shallow one instead (on the v1 fidelity model's validation split the two were within noise,
  attention slightly ahead in the full pipeline, so attention stays the default).
- at both, ``spread_floor`` of the kept tokens are evenly spaced over the tokens entering instead: both
  scores favour distinctive tokens and would keep no look-alike background, and a question about the
  whole image reads it from a sample that still represents the image.
All images of an encoder keep the same number of tokens (the encoder's budget), so tensors stay
rectangular. Encoders that cannot lose tokens inside (CNNs, windowed attention) are pruned at their
output with the similarity score instead (``prune_output``).

The stage works on any block with a pre-attention norm and q/k projections (``VitBlock``); the
adapters say where an encoder's blocks are. It wraps the ``forward`` of the block class (once, in the patch
registry); which blocks drop tokens in a call, and how, is in that call's ``percall.MeteorCall.vit``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar

import torch

from .. import percall
from ..core.select import compaction_index, floor_count, gather_tokens, spread, topk_beyond
from ..core.token_scores import cls_attention, received_attention, similarity_to_mean
from ..core.token_sizes import kept_sizes
from . import tensor_parallel


@dataclass(frozen=True)
class VitBlock:
    """How to read the attention inputs of one kind of ViT block."""

    norm: Callable[[torch.nn.Module], torch.nn.Module]
    attn: Callable[[torch.nn.Module], torch.nn.Module]

    def qk(self, layer: torch.nn.Module, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
        attn = self.attn(layer)
        normed = self.norm(layer)(hidden)
        heads = int(getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads"))
        b, t, _ = hidden.shape
        q = attn.q_proj(normed).view(b, t, heads, -1).transpose(1, 2)
        k = attn.k_proj(normed).view(b, t, heads, -1).transpose(1, 2)
        scale = float(getattr(attn, "scale", None) or getattr(attn, "scaling", None) or q.shape[-1] ** -0.5)
        return q, k, scale


HF_CLIP_BLOCK = VitBlock(norm=lambda layer: layer.layer_norm1, attn=lambda layer: layer.self_attn)


def boundaries(depth: int) -> Tuple[int, int]:
    """Indices of the blocks that start the 2nd and 3rd of three equal-depth segments."""
    if depth < 2:
        raise ValueError(
            f"Stage 1 (encoder=True) needs at least 2 encoder blocks before the selected layer, this encoder has "
            f"{depth}: set encoder=False for it"
        )
    shallow = max(1, round(depth / 3))
    deep = min(depth - 1, max(shallow, round(2 * depth / 3)))
    return shallow, deep


def split_drop(tokens: int, keep: int, shallow_share: float) -> Tuple[int, int]:
    """Tokens left after the shallow boundary and after the deep one."""
    drop = tokens - keep
    first = int(round(drop * shallow_share))
    return tokens - first, keep


@dataclass
class VitPlan:
    """Stage 1 for one forward of one ViT encoder."""

    patches: int  # patch tokens entering
    keep: int  # patch tokens leaving
    shallow: int
    deep: int
    after_shallow: int
    has_cls: bool
    deep_score: str = "attention"  # MeteorConfig.encoder_deep_score
    spread_floor: float = 0.0  # MeteorConfig.spread_floor
    positions: Optional[torch.Tensor] = None  # (B, n) original patch index of each surviving token
    track_sizes: bool = False  # MeteorConfig.proportional_attention: keep ``sizes`` up to date
    sizes: Optional[torch.Tensor] = None  # (B, n) patches each surviving token stands for (core/token_sizes.py)
    cache: Dict[int, torch.Tensor] = field(default_factory=dict)  # boundary -> gather index


class VitPruner:
    """Stage 1 inside one ViT encoder for one call: ``start`` plans it, ``running`` prunes the encoder's
    blocks while its forward runs. A forward nobody planned runs unpruned.

    The plan outlives the forward only for gradient checkpointing: checkpointed blocks run again during
    backward and find it by their input (``percall.recomputed_step``).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], block: VitBlock):
        self.layers = layers
        self.block = block
        self.plan: Optional[VitPlan] = None

    @classmethod
    def attach(cls, layers: Sequence[torch.nn.Module], block: VitBlock, registry: Any) -> "VitPruner":
        tensor_parallel.refuse_sharded(layers, "Stage 1")
        for block_cls in {type(layer) for layer in layers}:
            if not registry.is_patched(block_cls, "forward"):
                registry.patch(block_cls, "forward", _wrap_block_forward(block_cls.forward))
        return cls(layers, block)

    def start(self, patches: int, keep: int, depth: int, shallow_share: float, has_cls: bool,
              deep_score: str = "attention", spread_floor: float = 0.0, track_sizes: bool = False) -> VitPlan:
        shallow, deep = boundaries(depth)
        after_shallow, keep = split_drop(patches, keep, shallow_share)
        self.plan = VitPlan(patches, keep, shallow, deep, after_shallow, has_cls, deep_score, spread_floor,
                            track_sizes=track_sizes)
        return self.plan

    @contextlib.contextmanager
    def running(self) -> Iterator[VitPlan]:
        """Around the encoder's forward: its blocks follow the plan of ``start`` in the current call."""
        call = percall.current()
        if call is None or self.plan is None:
            raise RuntimeError("meteor-plugin Stage 1: an encoder was pruned outside a call, or before start()")
        ids = [id(layer) for layer in self.layers]
        for idx, key in enumerate(ids):
            call.vit[key] = (self, self.plan, idx)
        try:
            yield self.plan
        finally:
            for key in ids:
                call.vit.pop(key, None)

    def block_args(self, plan: VitPlan, idx: int, layer: torch.nn.Module, args: tuple, kwargs: dict):
        """The arguments block ``idx`` runs on under ``plan``, or None to run it as called."""
        if idx not in (plan.shallow, plan.deep):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if idx not in plan.cache:
            plan.cache[idx] = self._select(plan, idx, layer, hidden)
        hidden = gather_tokens(hidden, plan.cache[idx])
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @torch.no_grad()
    def _select(self, plan: VitPlan, idx: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Gather index over the block's input (CLS first, if any) for this boundary."""
        start = 1 if plan.has_cls else 0
        b, t, _ = hidden.shape
        patches = t - start
        if plan.positions is None or plan.positions.shape[1] != patches:
            plan.positions = torch.arange(patches, device=hidden.device).expand(b, patches)
        keep = torch.ones(b, patches, dtype=torch.bool, device=hidden.device)
        if idx == plan.shallow:
            count = min(plan.after_shallow, patches)
            floor = spread(patches, floor_count(plan.spread_floor, count), hidden.device)
            keep = topk_beyond(-similarity_to_mean(hidden[:, start:]), torch.full((b,), count, device=hidden.device),
                               floor, keep)
        if idx == plan.deep:  # also the shallow block in encoders too shallow for two boundaries
            count = min(plan.keep, patches)
            if plan.deep_score == "similarity":
                scores = -similarity_to_mean(hidden[:, start:])
            else:
                q, k, scale = self.block.qk(layer, hidden)
                scores = cls_attention(q, k, scale) if plan.has_cls else received_attention(q, k, scale)[:, start:]
            floor = spread(patches, floor_count(plan.spread_floor, count), hidden.device)
            keep = topk_beyond(scores, torch.full((b,), count, device=hidden.device), floor, keep)
        index, _ = compaction_index(keep)
        plan.positions = torch.gather(plan.positions, 1, index)
        if plan.track_sizes:
            plan.sizes = kept_sizes(hidden[:, start:], index, plan.sizes)
        if start:
            index = torch.cat([torch.zeros(b, 1, dtype=index.dtype, device=index.device), index + 1], dim=1)
        return index


def selected_depth(layers: int, select_layer: int) -> int:
    """Blocks that feed ``hidden_states[select_layer]`` (index 0 is the embeddings)."""
    depth = layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 0 < depth <= layers:
        raise ValueError(f"mm_vision_select_layer={select_layer} is outside a CLIP of {layers} layers")
    return depth


@contextlib.contextmanager
def vit_stage1(vit: Any, keep: int, cfg: Any, registry: Any, track_sizes: bool) -> Iterator[VitPlan]:
    """Stage 1 between the blocks of one ViT (``stages.vision.VitParts``) for what runs in the block: ``keep`` of
    its patches leave it; yields the plan, whose ``positions`` (and ``sizes``) are the kept patches' afterwards.
    The one place every family sets Stage 1 up inside a ViT (LLaVA's CLIP, transformers' CLIP and SigLIP,
    EAGLE's CLIP)."""
    pruner = VitPruner.attach(vit.layers, vit.block, registry)
    pruner.start(vit.patches, keep, vit.depth, cfg.encoder_shallow_share, has_cls=vit.has_cls,
                 deep_score=cfg.encoder_deep_score, spread_floor=cfg.spread_floor, track_sizes=track_sizes)
    with pruner.running() as plan:
        yield plan


def _wrap_block_forward(original: Any) -> Any:
    """The forward of a ViT block class: drops tokens at the boundaries of the encoder a call is pruning."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        call = percall.current()
        step = call.vit.get(id(self)) if call is not None else None
        if call is not None and torch.is_tensor(hidden):
            percall.remember_step(call, self, hidden, step)
        elif call is None and torch.is_tensor(hidden):
            step = percall.recomputed_step(self, hidden)  # gradient checkpointing, in backward
        changed = step[0].block_args(step[1], step[2], self, args, kwargs) if step is not None else None
        if changed is not None:
            args, kwargs = changed
        return original(self, *args, **kwargs)

    return forward


def prune_output(features: torch.Tensor, keep: int, spread_floor: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output-level Stage 1 for encoders that cannot lose tokens inside: drop the tokens most similar
    to the mean token, but a ``spread_floor`` share of the kept ones, evenly spaced over the grid.
    features: (B, N, C). Returns (kept features (B, keep, C), positions (B, keep))."""
    b, n, _ = features.shape
    if keep >= n:
        return features, torch.arange(n, device=features.device).expand(b, n)
    with torch.no_grad():
        mask = topk_beyond(-similarity_to_mean(features), torch.full((b,), keep, device=features.device),
                           spread(n, floor_count(spread_floor, keep), features.device),
                           torch.ones(b, n, dtype=torch.bool, device=features.device))
        index, _ = compaction_index(mask)
    return gather_tokens(features, index), index


T = TypeVar("T")


def attention_importance(layers: Sequence[torch.nn.Module], block: VitBlock, index: int, run: Callable[[], T],
                         has_cls: bool) -> Tuple[T, torch.Tensor]:
    """Run ``run()`` and return its result with the attention importance of block ``index``'s tokens
    (CLS attention, or mean received attention without a CLS token), from that block's own q/k."""
    captured: Dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = layers[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    with torch.no_grad():
        q, k, scale = block.qk(layers[index], captured["hidden"])
        importance = cls_attention(q, k, scale) if has_cls else received_attention(q, k, scale)
    return out, importance
