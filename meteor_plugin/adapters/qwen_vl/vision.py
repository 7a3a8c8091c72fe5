"""Stage 1 inside the Qwen-VL vision towers, and the pre-LLM baselines on their merged tokens.

A Qwen tower runs every image of a call as one packed sequence of patches, ``(patches, C)``, with ``cu_seqlens``
marking where each image (or each Qwen2.5-VL window) starts, and the rotary ``(cos, sin)`` of every patch passed
to each block by the tower's loop. Its patch merger concatenates every ``merge x merge`` square of patches (kept
contiguous by the processor) into one language-model token. So the unit Stage 1 drops is that square, a merged
token: a block at a boundary gets the kept squares' patch rows, and every later block gets ``cu_seqlens`` and
``(cos, sin)`` gathered to the kept rows (``PackedVitPruner``). Each kept token keeps its rotary position
inside the tower and its (t, h, w) position in the language model.

- Qwen2-VL, Qwen3-VL: every block attends over whole images; the boundaries are those of ``stages/encoder.py``
  (the shallow one by similarity to the mean token, the deep one by the attention each token receives, from the
  block's own q/k with its rotary embedding), per image, with Stage 1's spread floor.
- Qwen2.5-VL: the tower reorders the squares window by window (``window_index``) and most blocks attend within
  windows. A window that loses tokens attends among those it keeps (its segment shrinks), one that loses all is
  gone; the full-attention blocks still see whole images. The tower puts its output back in image order with an
  index over every square, so the merger's output is scattered back to full length (zeros where a square was
  dropped) and the kept rows are read from it.
- Qwen3-VL's DeepStack features (the merged outputs of a few middle blocks, added to the first decoder layers'
  visual tokens) are taken where each block's input was: they are gathered to the tokens kept at the end.

Budgets are per image (ratios of each image's merged tokens; a count is capped at an image's own tokens), so
images of different sizes share one call. Videos are not pruned here (``inference.py`` refuses them with Stage 1).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ... import percall
from ...compat.transformers import LayerCall
from ...core.budget import resolve_budget
from ...core.select import compaction_index, floor_count, spread, topk_beyond
from ...core.text_attention import apply_rope
from ...core.token_scores import received_attention, similarity_to_mean
from ...core.token_sizes import kept_sizes
from ...stages import baselines
from ...stages.encoder import VitPruner, boundaries, split_drop
from ..family import require

MERGER = "merger"  # the place of a Qwen2.5-VL merger in ``MeteorCall.vit`` (blocks have their index there)


@dataclass
class Encoded:
    """The visual tokens a call hands the language model, per image, and where each sits."""

    features: List[torch.Tensor]  # per image (k, D)
    kept: List[torch.Tensor]  # per image (k,) long: the merged token (row-major over t, h, w) each feature sits at
    sizes: List[torch.Tensor]  # per image (k,) float: merged tokens each stands for
    entered: List[int]  # per image: merged tokens before pruning
    stage: str  # "encoder" (Stage 1) or "baseline"
    output: Any  # the tower's output, with pooler_output (and deepstack_features) per image: mm_encoder_outputs

    @property
    def counts(self) -> List[int]:
        return [int(f.shape[0]) for f in self.features]


def merged_counts(visual: Any, grid: torch.Tensor) -> List[int]:
    unit = int(visual.spatial_merge_size) ** 2
    return [int(t) * int(h) * int(w) // unit for t, h, w in grid.tolist()]


def _image_keep(budget: Any, n: int) -> int:
    """An image's budget: a ratio of its merged tokens, or a count capped at them; never below one token."""
    return max(1, resolve_budget(budget, n))


# The packed ViT ---------------------------------------------------------------------------------------------------
@dataclass
class PackedPlan:
    """Stage 1 for one forward of one Qwen tower."""

    unit: int  # patches per merged token
    slot_image: torch.Tensor  # (G,) image of each merged token, in the tower's order
    slot_window: Optional[torch.Tensor]  # (G,) window of each (Qwen2.5-VL), None where blocks see whole images
    full_blocks: frozenset  # blocks that attend over whole images
    keep: List[int]  # per image
    after_shallow: List[int]
    shallow: int
    deep: int
    deep_score: str = "attention"
    spread_floor: float = 0.0
    track_sizes: bool = False
    alive: Optional[torch.Tensor] = None  # (G',) slots alive, ascending
    sizes: Optional[torch.Tensor] = None  # (G',) merged tokens each alive one stands for
    history: List[Tuple[int, torch.Tensor]] = field(default_factory=list)  # (from block, alive slots)
    steps: Dict[int, torch.Tensor] = field(default_factory=dict)  # boundary -> rows of its input kept
    segments: Dict[Tuple[bool, int], Tuple[torch.Tensor, int]] = field(default_factory=dict)  # -> (cu_seqlens, max)

    def alive_at(self, block: int) -> torch.Tensor:
        """Slots alive in the output of ``block``."""
        current = self.history[0][1]
        for start, slots in self.history:
            if start <= block:
                current = slots
        return current

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots[:, None] * self.unit + torch.arange(self.unit, device=slots.device)).flatten()


class PackedVitPruner(VitPruner):
    """Stage 1 inside one Qwen tower for one call (``VitPruner``'s protocol, on a packed sequence)."""

    merger: Optional[torch.nn.Module] = None

    def start_packed(self, plan: PackedPlan) -> PackedPlan:
        plan.alive = torch.arange(plan.slot_image.shape[0], device=plan.slot_image.device)
        plan.history = [(-1, plan.alive)]
        if plan.track_sizes:
            plan.sizes = torch.ones(plan.alive.shape[0], dtype=torch.float32, device=plan.alive.device)
        self.plan = plan
        return plan

    @contextlib.contextmanager
    def running(self) -> Iterator[Any]:
        with super().running() as plan:
            call = percall.current()
            if self.merger is not None:
                call.vit[id(self.merger)] = (self, plan, MERGER)
            try:
                yield plan
            finally:
                if self.merger is not None:
                    call.vit.pop(id(self.merger), None)

    def block_args(self, plan: PackedPlan, idx: int, layer: torch.nn.Module, args: tuple, kwargs: dict):
        if idx < plan.shallow:
            return None
        call = LayerCall(layer, args, kwargs)
        cos, sin = call.get("position_embeddings")
        if idx in (plan.shallow, plan.deep):
            hidden = call.get("hidden_states")
            if idx not in plan.steps:
                before = plan.alive
                rows = plan.rows(before)
                plan.steps[idx] = self._select(plan, idx, layer, hidden, cos[rows], sin[rows], before)
                plan.segments.clear()
            call.set("hidden_states", hidden[plan.steps[idx]])
        slots = plan.alive_at(idx)  # under checkpointing's recomputation too: what this block saw
        rows = plan.rows(slots)
        call.set("position_embeddings", (cos[rows], sin[rows]))
        full = idx in plan.full_blocks
        cu, longest = _segments(plan, slots, full)
        call.set("cu_seqlens", cu.to(call.get("cu_seqlens").dtype))
        if call.get("max_seqlen") is not None:
            given = call.get("max_seqlen")
            call.set("max_seqlen", torch.tensor(longest, device=given.device) if torch.is_tensor(given) else longest)
        return call.call_args()

    @torch.no_grad()
    def _select(self, plan: PackedPlan, idx: int, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """Which rows of this block's input go on; updates the plan's alive slots (and sizes)."""
        groups = hidden.float().view(-1, plan.unit, hidden.shape[-1]).mean(dim=1)  # (G', C): one per merged token
        images = plan.slot_image[before]
        attention = None
        if idx == plan.deep and plan.deep_score == "attention":
            attention = _received(layer, hidden, cos, sin, _segment_ids(plan, before, idx in plan.full_blocks))
            attention = attention.view(-1, plan.unit).mean(dim=1)
        keep = torch.ones(before.shape[0], dtype=torch.bool, device=hidden.device)
        sizes = plan.sizes
        new_sizes = []
        for image in range(len(plan.keep)):
            mine = torch.nonzero(images == image).flatten()
            if mine.numel() == 0:
                continue
            n = mine.numel()
            local = torch.ones(1, n, dtype=torch.bool, device=hidden.device)
            feats = groups[mine][None]
            if idx == plan.shallow:
                count = min(plan.after_shallow[image], n)
                local = topk_beyond(-similarity_to_mean(feats), torch.tensor([count], device=hidden.device),
                                    spread(n, floor_count(plan.spread_floor, count), hidden.device), local)
            if idx == plan.deep:  # also the shallow block of a tower too shallow for two boundaries
                count = min(plan.keep[image], int(local.sum()))
                scores = attention[mine][None] if attention is not None else -similarity_to_mean(feats)
                local = topk_beyond(scores, torch.tensor([count], device=hidden.device),
                                    spread(n, floor_count(plan.spread_floor, count), hidden.device), local)
            keep[mine] = local[0]
            if plan.track_sizes:
                index, _ = compaction_index(local)
                new_sizes.append(kept_sizes(feats, index, sizes[mine][None])[0])
        plan.alive = before[keep]
        if plan.track_sizes:
            plan.sizes = torch.cat(new_sizes) if new_sizes else sizes[:0]
        plan.history.append((idx, plan.alive))
        return plan.rows(torch.nonzero(keep).flatten())


def _segment_ids(plan: PackedPlan, slots: torch.Tensor, full: bool) -> torch.Tensor:
    """Per alive slot, the attention segment it is in: its image, or its window in a windowed block."""
    if full or plan.slot_window is None:
        return plan.slot_image[slots]
    return plan.slot_window[slots]


def _segments(plan: PackedPlan, slots: torch.Tensor, full: bool) -> Tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32) and the longest segment over the alive rows; an emptied window is gone."""
    key = (full, int(slots.shape[0]))
    cached = plan.segments.get(key)
    if cached is None:
        _, counts = torch.unique_consecutive(_segment_ids(plan, slots, full), return_counts=True)
        counts = counts * plan.unit
        cu = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0), value=0)
        cached = plan.segments[key] = (cu, int(counts.max()) if counts.numel() else 0)
    return cached


def _received(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              segment: torch.Tensor) -> torch.Tensor:
    """Mean attention each patch row receives in this block (heads and queries of its segment), from the block's
    own norm, fused q/k/v projection and rotary embedding, as the block computes them. (rows,) float32."""
    attn = layer.attn
    heads = int(getattr(attn, "num_heads", None) or attn.config.num_heads)
    qkv = attn.qkv(layer.norm1(hidden)).view(hidden.shape[0], 3, heads, -1)
    q, k = qkv[:, 0].transpose(0, 1).float(), qkv[:, 1].transpose(0, 1).float()  # (H, rows, d)
    q = apply_rope(q[None], cos.float()[None], sin.float()[None])[0]
    k = apply_rope(k[None], cos.float()[None], sin.float()[None])[0]
    scale = float(getattr(attn, "scaling", q.shape[-1] ** -0.5))
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _, counts = torch.unique_consecutive(segment, return_counts=True)
    per_slot = hidden.shape[0] // segment.shape[0]
    start = 0
    for n in counts.tolist():
        stop = start + n * per_slot
        out[start:stop] = received_attention(q[None, :, start:stop], k[None, :, start:stop], scale)[0]
        start = stop
    return out


def wrap_merger_forward(original: Any) -> Any:
    """Qwen2.5-VL's patch merger: under Stage 1, its output scattered back to one row per merged token of the
    whole images (zeros where one was dropped), so that the tower's own reordering by window runs unchanged."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        call = percall.current()
        step = call.vit.get(id(self)) if call is not None else None
        if step is None:
            return out
        plan = step[1]
        full = out.new_zeros(plan.slot_image.shape[0], out.shape[-1])
        full[plan.alive] = out
        return full

    return forward


# Encoding a call's images ----------------------------------------------------------------------------------------
def check_tower(visual: Any) -> None:
    require(visual, ("blocks", "merger", "spatial_merge_size"), type(visual).__name__)
    for block in visual.blocks:
        require(block, ("norm1", "attn"), type(block).__name__)
        require(block.attn, ("qkv",), type(block.attn).__name__)


def _window_index(visual: Any, grid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's order of merged tokens by window and its windows' ``cu_seqlens``, from the tower's own code:
    a method of the tower before transformers 5.x moved it to a function of the modeling module."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid)
    import sys

    find = getattr(sys.modules[type(visual).__module__], "get_vision_window_index")
    return find(grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size)


def _tower_layout(visual: Any, grid: torch.Tensor, counts: List[int]):
    """(order: merged token at each slot of the tower's sequence or None for image order, image of each slot,
    window of each slot or None, the blocks that see whole images)."""
    device = grid.device
    image_of = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    blocks = len(visual.blocks)
    if getattr(visual, "fullatt_block_indexes", None) is None:
        return None, image_of, None, frozenset(range(blocks))
    order, cu_windows = _window_index(visual, grid)
    order = order.to(device)
    unit = int(visual.spatial_merge_size) ** 2
    slots = torch.arange(order.shape[0], device=device) * unit
    window = torch.searchsorted(cu_windows.to(device)[1:].long(), slots, right=True)
    return order, image_of[order], window, frozenset(int(i) for i in visual.fullatt_block_indexes)


def encode_stage1(inner: Any, cfg: Any, pixels: torch.Tensor, grid: torch.Tensor, registry: Any,
                  track_sizes: bool) -> Encoded:
    """Every image through the tower with Stage 1 inside it."""
    visual = inner.visual
    check_tower(visual)
    if bool((grid[:, 0] != 1).any()):  # the tower attends per frame: one segment per image is what Stage 1 keeps
        raise NotImplementedError(f"meteor-plugin Stage 1 on {type(inner).__name__} takes still images (one temporal "
                                  f"patch), got grids {grid.tolist()}")
    counts = merged_counts(visual, grid)
    keep = [_image_keep(cfg.encoder_keep, n) for n in counts]
    shallow, deep = boundaries(len(visual.blocks))
    order, slot_image, slot_window, full = _tower_layout(visual, grid, counts)
    pruner = PackedVitPruner.attach(visual.blocks, None, registry)
    pruner.merger = visual.merger if order is not None else None
    plan = pruner.start_packed(PackedPlan(
        unit=int(visual.spatial_merge_size) ** 2, slot_image=slot_image, slot_window=slot_window, full_blocks=full,
        keep=keep, after_shallow=[split_drop(n, k, cfg.encoder_shallow_share)[0] for n, k in zip(counts, keep)],
        shallow=shallow, deep=deep, deep_score=cfg.encoder_deep_score, spread_floor=cfg.spread_floor,
        track_sizes=track_sizes))
    with pruner.running():
        out = visual(pixels.type(visual.dtype), grid_thw=grid)
    pooled = out.pooler_output
    sizes = plan.sizes if plan.sizes is not None else torch.ones(plan.alive.shape[0])
    if order is not None:  # Qwen2.5-VL: the tower gave every merged token back in image order (zeros: dropped)
        groups = order[plan.alive]
        perm = torch.argsort(groups)
        groups, sizes = groups[perm], sizes[perm.to(sizes.device)]
        features = pooled[groups]
    else:
        groups, features = plan.alive, pooled
    deepstack = None
    if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: each taken after its own block
        layers = list(getattr(visual, "deepstack_visual_indexes", []))
        deepstack = [feat[torch.searchsorted(plan.alive_at(j), plan.alive)] for j, feat in zip(layers, out.deepstack_features)]
    left = [int((slot_image[plan.alive] == i).sum()) for i in range(len(counts))]
    offsets = [0] + list(torch.tensor(counts).cumsum(0)[:-1].tolist())
    kept = [g - o for g, o in zip(torch.split(groups, left), offsets)]
    out.pooler_output = tuple(torch.split(features, left))
    if deepstack is not None:
        out.deepstack_features = [tuple(torch.split(d, left)) for d in deepstack]
    return Encoded(list(out.pooler_output), kept, list(torch.split(sizes.float().cpu(), left)), counts, "encoder", out)


# Pre-LLM baselines on the merged tokens ----------------------------------------------------------------------------
def _last_block_importance(visual: Any, grid: torch.Tensor, run: Any) -> Tuple[Any, torch.Tensor]:
    """Run the tower (``run()``) and return its output with each merged token's importance: the mean attention its
    patches receive in the last block, over its image (VisionZip's score for a tower without a CLS token)."""
    captured: Dict[str, Any] = {}
    last = visual.blocks[-1]

    def grab(module, args, kwargs):
        bound = LayerCall(module, args, kwargs)
        captured["hidden"], captured["pe"] = bound.get("hidden_states"), bound.get("position_embeddings")

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    counts = merged_counts(visual, grid)
    order, slot_image, _, _ = _tower_layout(visual, grid, counts)
    unit = int(visual.spatial_merge_size) ** 2
    with torch.no_grad():
        cos, sin = captured["pe"]
        received = _received(last, captured["hidden"], cos, sin, slot_image).view(-1, unit).mean(dim=1)
    if order is not None:  # Qwen2.5-VL's blocks see merged tokens in window order
        received = received[torch.argsort(order)]
    return out, received


def encode_baseline(inner: Any, cfg: Any, pixels: torch.Tensor, grid: torch.Tensor) -> Encoded:
    """A pre-LLM baseline on every image's merged tokens (the tower unpruned): ``fusion_keep`` of them per image, as
    on the other families. Each kept row is a mix of the image's merged tokens (one of them, or an average), at
    the (t, h, w) place of the token it is built around."""
    visual = inner.visual
    if cfg.method == "drop_encoder":
        raise NotImplementedError(
            f"meteor-plugin: the 'drop_encoder' baseline removes one of several encoders, and "
            f"{type(inner).__name__} has one vision tower: choose another method")
    if bool((grid[:, 0] != 1).any()):
        raise NotImplementedError(f"meteor-plugin: the {cfg.method!r} baseline on {type(inner).__name__} takes still "
                                  f"images (one temporal patch), got grids {grid.tolist()}")
    counts = merged_counts(visual, grid)

    def run():
        return inner.get_image_features(pixels, grid, return_dict=True)

    if cfg.method == "visionzip":
        out, importance = _last_block_importance(visual, grid, run)
        importance = torch.split(importance, counts)
    else:
        out, importance = run(), [None] * len(counts)
    merge = int(visual.spatial_merge_size)
    features, kept, sizes, mixes = [], [], [], []
    for i, (feat, (_, h, w), score) in enumerate(zip(out.pooler_output, grid.tolist(), importance)):
        n = feat.shape[0]
        k = _image_keep(cfg.fusion_keep, n)
        if cfg.method == "random":
            rows, anchors = baselines.random_rows(n, k, cfg.seed + i)
        elif cfg.method == "avgpool":
            rows, anchors = baselines.pooled_rows(int(h) // merge, int(w) // merge, k)
        else:
            rows, anchors = baselines.visionzip_rows(feat, score, k)
        mix = rows.to(feat.device, torch.float32)
        mixes.append(mix)
        features.append((mix @ feat.float()).to(feat.dtype))
        kept.append(anchors)
        sizes.append((rows > 0).sum(dim=1).float())
    out.pooler_output = tuple(features)
    if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: the same mix of each DeepStack feature
        out.deepstack_features = [tuple((m @ d.float()).to(d.dtype) for m, d in zip(mixes, per_image))
                                  for per_image in out.deepstack_features]
    return Encoded(features, kept, sizes, counts, "baseline", out)
