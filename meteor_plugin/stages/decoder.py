"""Stage 3: adaptive text-guided pruning of visual tokens inside the language model.

At decoder layer ``llm_layer`` the instruction tokens' attention to the visual tokens is recomputed
from that layer's own q/k projections (RoPE at the real positions, GQA heads repeated), so the model
keeps running SDPA or FlashAttention. The heads with the highest visual attention value (at least
``llm_min_heads``) score the tokens and set the budget per sample: ``K = llm_lambda * signal``, the
signal being their attention mass on visual tokens (the paper's), how many visual tokens or distinct
regions that attention spreads over, or how many tokens it takes to cover most of it (``"coverage"``,
the default), read at that layer or averaged over the layers up to it (``llm_signal_layers``). The
kept tokens are the most attended (``llm_selection="top"``) or those that cover most of the attention
(``"coverage"``, the default: ``core/coverage.py``). From that layer on, every layer runs on
the compacted sequence: hidden states, position ids, rotary tables, masks and cache positions are
gathered per layer, kept tokens keep their original position ids, and the KV cache of those layers
holds only the kept tokens. Layers before ``llm_layer`` (and so layer 0's cache, which transformers
uses for length bookkeeping) keep the full sequence.

The stage wraps the ``forward`` of the decoder-layer class of any Llama-family ``LlamaModel`` (once, in
the patch registry); it knows nothing of LLaVA or EAGLE. What a layer does in a call comes from that
call's ``DecoderPruner`` (``percall.MeteorCall.decoder``), never from the model: a layer of a model that
no call is pruning runs as it is. The adapters hand the call a ``VisualLayout`` before each prefill.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Dict, Iterator, Optional

import torch

from .. import percall
from ..compat import transformers as compat
from ..config import MeteorConfig
from ..core.budget import adaptive_keep, resolve_budget, resolve_budget_per_sample
from ..core.coverage import coverage_count, coverage_keep, similarities
from ..core.select import compaction_index, gather_tokens, topk_mask
from ..core.token_sizes import absorbed_sizes
from ..core.text_attention import (apply_rope, attended_regions, attention_spread, mean_query_attention,
                                   select_heads)
from ..stats import UNKNOWN_VISUAL, RunStats
from . import attention_bias, proportional, tensor_parallel
from .layout import IGNORE_INDEX, VisualLayout


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Score with dropout (e.g. LoRA's) off, so the selection is deterministic in training too."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def llm_dims(config: Any) -> Dict[str, int]:
    heads = int(config.num_attention_heads)
    return {
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


def check_against_model(cfg: MeteorConfig, config: Any) -> int:
    """Validate Stage 3 settings against the language model; returns the number of heads used."""
    dims = llm_dims(config)
    if not 1 <= cfg.llm_layer < dims["layers"]:
        raise ValueError(
            f"MeteorConfig.llm_layer={cfg.llm_layer} is invalid for this model: allowed 1..{dims['layers'] - 1} "
            f"(it has {dims['layers']} decoder layers; layer 0 must keep the full sequence)"
        )
    if isinstance(cfg.llm_top_heads, int) and cfg.llm_top_heads > dims["heads"]:
        raise ValueError(
            f"MeteorConfig.llm_top_heads={cfg.llm_top_heads} is invalid for this model: allowed 1..{dims['heads']} "
            f"(its number of attention heads) or a ratio in (0, 1]"
        )
    return min(dims["heads"], max(cfg.llm_min_heads, resolve_budget(cfg.llm_top_heads, dims["heads"])))


def query_attention(layer: torch.nn.Module, call: compat.LayerCall, hidden: torch.Tensor,
                    query: torch.Tensor, valid: torch.Tensor, dims: Dict[str, int],
                    key_bias: Optional[torch.Tensor] = None, normed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the query tokens at this layer, from its own norm and q/k projections.

    hidden: (B, L, D) the layer's input; query, valid: (B, L) bool. Returns (B, H, L): per head, the
    attention of the valid query tokens averaged over them, exactly what the layer's softmax gives
    those rows, without forming the full L x L map. Modules are called (never their ``.weight``), so
    ZeRO-3 partitioned, LoRA-wrapped and quantised projections all work. ``normed``: the layer's
    ``input_layernorm(hidden)`` when the caller has it already.
    """
    b, length, _ = hidden.shape
    attn = layer.self_attn
    q_index, q_valid = compaction_index(query)
    with _eval_mode(layer.input_layernorm, attn.q_proj, attn.k_proj):
        normed = layer.input_layernorm(hidden) if normed is None else normed
        q = attn.q_proj(gather_tokens(normed, q_index))
        k = attn.k_proj(normed)
    heads, kv_heads = tensor_parallel.local_heads(attn, q.shape[-1], k.shape[-1], dims)  # a slice under tp_plan
    q = q.view(b, q_index.shape[1], heads, dims["head_dim"])
    k = k.view(b, length, kv_heads, dims["head_dim"])
    q, k = _head_norms(attn, q, k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = compat.rope_cos_sin(layer, call, hidden)
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    q = apply_rope(q, gather_tokens(cos, q_index), gather_tokens(sin, q_index))
    k = apply_rope(k, cos, sin)
    scale = float(getattr(attn, "scaling", dims["head_dim"] ** -0.5))
    rows = mean_query_attention(q, k, q_index, q_valid, valid, scale, key_bias=key_bias)
    return tensor_parallel.all_heads(attn, rows, dims["heads"])


def _head_norms(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """Per-head norms before RoPE where the attention has them (Qwen3's ``q_norm``/``k_norm``), called as the
    layer calls them, on (B, L, heads, head_dim)."""
    if getattr(attn, "q_norm", None) is None and getattr(attn, "k_norm", None) is None:
        return q, k
    with _eval_mode(attn):
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
    return q, k


class _Prefix:
    """What decoding steps need to know about a pruned prefill: Stage 3's compaction from ``layer`` on,
    and under proportional attention the prefill's key biases and the position the next token takes."""

    def __init__(self, layer: int, valid: torch.Tensor, full_len: int, full_valid: Optional[torch.Tensor] = None,
                 full_bias: Optional[torch.Tensor] = None, next_position: Optional[torch.Tensor] = None):
        self.layer = layer
        self.valid = valid  # (B, L') kept-token validity of the compacted prefix
        self.full_len = full_len  # length of the uncompacted prefill (with padding)
        self.full_valid = full_valid  # (B, full_len), for the layers before ``layer``
        self.full_bias = full_bias  # (B, full_len) or None
        self.bias: Optional[torch.Tensor] = full_bias  # (B, L') of the compacted prefix once Stage 3 ran
        self.next_position = next_position  # (B,) or None: positions continue from the unpruned count


class _Plan:
    """Stage 3 for one forward of the language model."""

    def __init__(self, mode: str, cfg: MeteorConfig, stats: Optional[RunStats], valid: torch.Tensor,
                 layout: Optional[VisualLayout] = None, prefix: Optional[_Prefix] = None,
                 raw_mask: Optional[torch.Tensor] = None):
        self.mode = mode  # "prefill" or "decode"
        self.cfg = cfg
        self.layer = prefix.layer if prefix is not None else cfg.llm_layer  # decoding follows its prefill
        self.stats = stats
        self.valid = valid
        self.layout = layout
        self.prefix = prefix
        self.raw_mask = raw_mask
        self.prunes = (mode == "decode") or (
            cfg.llm and layout is not None and bool(layout.visual.any())
        )
        self.index: Optional[torch.Tensor] = None  # (B, L') positions kept, in order
        self.kept_valid: Optional[torch.Tensor] = None  # (B, L') False on re-padding slots
        self.kept_visual: Optional[torch.Tensor] = None  # (B, L) visual tokens kept
        self.subs: Optional[Dict[str, Any]] = None
        self.full_subs: Optional[Dict[str, Any]] = None  # proportional attention, layers before ``layer``
        self.column: Any = None  # proportional attention's key column (attention_bias), compacted layers
        self.full_column: Any = None  # and layers before ``layer``
        self.key_bias = layout.key_bias if layout is not None else None  # (B, L) proportional attention
        self.early_signals: list = []  # llm_signal_layers="up_to": the budget signal of each layer before ``layer``
        self.early_scores: list = []  # llm_score_layers="up_to": each such layer's attention on the visual tokens


class DecoderPruner:
    """Stage 3 for one call of one language model: the plan of its current forward and, in generate, what
    its decoding steps need to know about the pruned prefill. Created per call, never kept on the model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.plan: Optional[_Plan] = None
        self.prefix: Optional[_Prefix] = None
        self.heads_used = 0
        self.tp: Optional[tensor_parallel.TensorParallel] = None  # the tensor-parallel group, found at each prefill
        self.layer_index = {id(layer): idx for idx, layer in enumerate(model.layers)}

    @classmethod
    def attach(cls, model: torch.nn.Module, registry: Any) -> "DecoderPruner":
        """Check the model's structure, make sure its decoder-layer classes run Stage 3, and return a
        pruner for one call."""
        layers = getattr(model, "layers", None)
        if layers is None or len(layers) == 0:
            raise RuntimeError(
                f"meteor-plugin Stage 3: {type(model).__name__} has no decoder `layers`; "
                "the llm stage needs a Llama-family model"
            )
        tensor_parallel.refuse_pipeline(layers)
        for layer in layers:  # every layer: one missing projection would fail mid-forward otherwise
            for required in ("input_layernorm", "self_attn"):
                if not hasattr(layer, required):
                    raise RuntimeError(
                        f"meteor-plugin Stage 3: decoder layer {type(layer).__name__} has no `{required}`; "
                        "the llm stage needs Llama-style decoder layers"
                    )
            for required in ("q_proj", "k_proj"):
                if not hasattr(layer.self_attn, required):
                    raise RuntimeError(
                        f"meteor-plugin Stage 3: attention {type(layer.self_attn).__name__} has no "
                        f"`{required}` projection; the llm stage needs Llama-style attention"
                    )
        for layer_cls in {type(layer) for layer in layers}:
            if not registry.is_patched(layer_cls, "forward"):
                registry.patch(layer_cls, "forward", _wrap_layer_forward(layer_cls.forward))
        attention_bias.install(registry)
        return cls(model)

    # Per forward -------------------------------------------------------------------------------------
    def begin(self, cfg: MeteorConfig, layout: Optional[VisualLayout], batch: int, length: int,
              attention_mask: Optional[torch.Tensor], past: Any, device: torch.device,
              unknown_visual: bool = False) -> None:
        past_len = compat.past_length(past, 0)
        if attention_mask is not None and torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
            raw = attention_mask
        else:
            raw = None
        if past_len == 0:
            layout = _expanded(layout, batch, length, raw)
            if layout is not None and layout.shape != (batch, length):
                raise RuntimeError(
                    f"meteor-plugin: the visual layout {layout.shape} does not match the language model input "
                    f"{(batch, length)}; was the model called with inputs_embeds built elsewhere?"
                )
            if cfg.llm:
                self.heads_used = check_against_model(cfg, self.model.config)
            valid = raw[:, -length:].bool() if raw is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
            stats = layout.stats if layout is not None else RunStats(batch)
            changes = cfg.llm or (layout is not None and layout.positions is not None)  # the layers' sequence or masks
            self.tp = tensor_parallel.prefill(self.model, cfg, changes, valid,
                                              layout.visual if layout is not None else None)
            if unknown_visual:
                stats.notes.append(UNKNOWN_VISUAL)
            if layout is not None and layout.positions is not None and not attention_bias.runs_with(
                    compat.mask_kind(self.model.config, None)):
                proportional.unavailable(cfg, self.model, "adds a bias to the attention logits, which FlashAttention-2 "
                                         "cannot take on transformers 4.x (whose attention classes compute inline): "
                                         "load the model with attn_implementation='sdpa' to have it")
                layout.positions = layout.key_bias = None  # "auto": this call's layout, as without it
            self.plan = _Plan("prefill", cfg, stats, valid, layout=layout)
            self.prefix = None
            if layout is not None and layout.positions is not None:
                # (B, L), or (rows, B, L) for multimodal RoPE: each row continues from its own largest position
                next_position = layout.positions.masked_fill(~valid, -1).max(dim=-1).values + 1
                self.prefix = _Prefix(len(self.layer_index), valid, length, valid, layout.key_bias, next_position)
            percall.record_stats(self.model, stats)
            return
        if self.prefix is None:
            _refuse_pruned_cache(past, len(self.layer_index))
            _refuse_unpruned_positions(past)
            self.plan = None  # the prefill pruned nothing: decoding needs no help
            return
        if batch != self.prefix.valid.shape[0]:
            raise NotImplementedError(
                f"meteor-plugin Stage 3: a decoding step has batch {batch} but the pruned prefill had "
                f"{self.prefix.valid.shape[0]}; beam search and batch reshaping are not supported with the llm stage"
            )
        self.plan = _Plan("decode", cfg, None, torch.ones(batch, length, dtype=torch.bool, device=device),
                          prefix=self.prefix, raw_mask=raw)

    # One layer call -----------------------------------------------------------------------------------
    def layer_args(self, plan: _Plan, idx: int, layer: torch.nn.Module, args: tuple, kwargs: dict):
        """The arguments layer ``idx`` runs on under ``plan``: (args, kwargs, rotary floor), or None."""
        call = compat.LayerCall(layer, args, kwargs)
        hidden = call.get("hidden_states")
        if not plan.prunes or idx < plan.layer:
            if plan.mode == "prefill":
                plan.stats.record_layer(idx, hidden.shape[1], plan.valid.sum(1).tolist())
                if plan.prunes and plan.index is None and _reads_early_signal(plan.cfg, idx):
                    self._early_signal(plan, layer, call, hidden)
            return self._full_length_bias(plan, idx, call, hidden)
        if plan.mode == "prefill":
            if idx == plan.layer:
                if plan.index is None:
                    self._select(plan, layer, call, hidden)
                hidden = gather_tokens(hidden, plan.index)
                call.set("hidden_states", hidden)
            elif hidden.shape[1] != plan.index.shape[1]:
                raise RuntimeError(
                    f"meteor-plugin Stage 3: layer {idx} got {hidden.shape[1]} tokens, expected the compacted "
                    f"{plan.index.shape[1]}"
                )
            self._prefill_substitutes(plan, call, hidden)
            plan.stats.record_layer(idx, hidden.shape[1], plan.kept_valid.sum(1).tolist())
        else:
            self._decode_substitutes(plan, idx, call, hidden)
        for name, value in plan.subs.items():
            if call.has(name):
                call.set(name, value)
        args, kwargs = call.call_args()
        return args, kwargs, attention_bias.around(call, plan.column)

    # Selection -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _select(self, plan: _Plan, layer: torch.nn.Module, call: compat.LayerCall, hidden: torch.Tensor) -> None:
        cfg, layout = plan.cfg, plan.layout
        visual = layout.visual & plan.valid
        query = layout.query & plan.valid
        entered = visual.sum(dim=1)
        dims = llm_dims(self.model.config)
        with _eval_mode(layer.input_layernorm):  # what the layer's keys come from: scoring, regions, sizes share it
            normed = layer.input_layernorm(hidden)
        if cfg.method == "fastv":
            # FastV: the last instruction token's attention, all heads, a fixed budget.
            pos = torch.arange(query.shape[1], device=query.device)
            last = torch.where(query, pos, torch.full_like(pos, -1)).max(dim=1).values
            query = (pos == last[:, None]) & (last >= 0)[:, None]
            rel = select_heads(query_attention(layer, call, hidden, query, plan.valid, dims, plan.key_bias, normed),
                               visual, dims["heads"])
            budget = resolve_budget_per_sample(cfg.llm_max_keep, entered)
            signal = rel.mass
        else:
            rel = select_heads(query_attention(layer, call, hidden, query, plan.valid, dims, plan.key_bias, normed),
                               visual, self.heads_used)
            zs = _similarities(cfg, visual, normed)  # the tokens' likeness, shared by the signal and the selection
            signal = self._budget_signal(cfg, rel, visual, normed, zs, _count_limit(cfg, entered))
            if plan.early_signals:  # llm_signal_layers="up_to": the mean over the layers up to this one
                signal = torch.stack(plan.early_signals + [signal.float()]).mean(dim=0)
            budget = adaptive_keep(signal, cfg.llm_lambda, entered, cfg.llm_min_keep, cfg.llm_max_keep)
        scores = rel.scores
        if plan.early_scores:  # llm_score_layers="up_to": the mean attention over the layers up to this one
            scores = torch.stack(plan.early_scores + [_on_visual(scores, visual)]).mean(dim=0)
        if cfg.method != "fastv" and cfg.llm_selection == "coverage":  # FastV keeps its paper's top-K
            kept_visual = coverage_keep(scores, budget, visual, normed, cfg.llm_region_sharpness, zs)
        else:
            kept_visual = topk_mask(scores, budget, visual)
        kept_visual = tensor_parallel.agree(self.tp, kept_visual)  # rank 0's, on every rank
        keep = plan.valid & (~visual | kept_visual)
        left_padded = bool((~plan.valid[:, 0]).any()) and not bool((~plan.valid[:, -1]).any())
        plan.index, plan.kept_valid = compaction_index(keep, align_right=left_padded)
        plan.kept_visual = kept_visual
        if plan.key_bias is not None:  # proportional attention: the dropped tokens' sizes go to the kept ones
            plan.key_bias = tensor_parallel.agree(self.tp, _absorbed_bias(plan.key_bias, normed, visual, kept_visual))
        plan.stats.set_stage(
            "llm", entered, kept_visual.sum(dim=1),
            mass=rel.mass.float(), signal=signal.float(),
            query_tokens=query.sum(dim=1),
            heads=[torch.nonzero(h).flatten() for h in rel.heads],
            kept=[torch.nonzero(k[v]).flatten() for k, v in zip(kept_visual, visual)],
        )
        geometry = self.prefix
        self.prefix = _Prefix(plan.layer, plan.kept_valid, hidden.shape[1])
        if geometry is not None:  # proportional attention: keep what the full-length layers need
            self.prefix.full_valid, self.prefix.full_bias = geometry.full_valid, geometry.full_bias
            self.prefix.next_position = geometry.next_position
            if plan.key_bias is not None:
                self.prefix.bias = gather_tokens(plan.key_bias, plan.index)

    @torch.no_grad()
    def _early_signal(self, plan: _Plan, layer: torch.nn.Module, call: compat.LayerCall, hidden: torch.Tensor) -> None:
        """The budget signal of a layer before Stage 3's, from its own norm and q/k, as ``_select`` reads it."""
        layout = plan.layout
        visual = layout.visual & plan.valid
        with _eval_mode(layer.input_layernorm):
            normed = layer.input_layernorm(hidden)
        attn = query_attention(layer, call, hidden, layout.query & plan.valid, plan.valid, llm_dims(self.model.config),
                               plan.key_bias, normed)
        rel = select_heads(attn, visual, self.heads_used)
        if plan.cfg.llm_signal_layers == "up_to":
            limit = _count_limit(plan.cfg, visual.sum(dim=1))
            plan.early_signals.append(self._budget_signal(plan.cfg, rel, visual, normed, limit=limit).float())
        if plan.cfg.llm_score_layers == "up_to":
            plan.early_scores.append(_on_visual(rel.scores, visual))

    @staticmethod
    def _budget_signal(cfg: MeteorConfig, rel: Any, visual: torch.Tensor, normed: torch.Tensor,
                       zs: Optional[list] = None, limit: Optional[int] = None) -> torch.Tensor:
        if cfg.llm_budget_signal == "coverage":  # on the states the layer's keys are computed from
            return coverage_count(rel.scores, visual, normed, cfg.llm_coverage_share, cfg.llm_region_sharpness,
                                  limit, zs)
        if cfg.llm_budget_signal == "mass":
            return rel.mass
        if cfg.llm_budget_signal == "regions":  # on the states the layer's keys are computed from
            return attended_regions(rel.scores, visual, normed, cfg.llm_region_sharpness)
        return attention_spread(rel.scores, visual)

    def _prefill_substitutes(self, plan: _Plan, call: compat.LayerCall, hidden: torch.Tensor) -> None:
        if plan.subs is not None:
            return
        kind = compat.mask_kind(self.model.config, call.get("attention_mask"))
        bias = gather_tokens(plan.key_bias, plan.index) if plan.key_bias is not None else None  # after _select
        mask, plan.column = attention_bias.layer_mask(kind, plan.kept_valid, plan.kept_valid, hidden.dtype, bias)
        subs: Dict[str, Any] = {"attention_mask": mask}
        position_ids = call.get("position_ids")
        if position_ids is not None:
            subs["position_ids"] = gather_tokens(position_ids, plan.index)
        pe = call.get("position_embeddings")
        if pe is not None:
            subs["position_embeddings"] = (gather_tokens(pe[0], plan.index), gather_tokens(pe[1], plan.index))
        if call.get("cache_position") is not None:
            subs["cache_position"] = torch.arange(plan.index.shape[1], device=hidden.device)
        plan.subs = subs

    def _decode_substitutes(self, plan: _Plan, idx: int, call: compat.LayerCall, hidden: torch.Tensor) -> None:
        if plan.subs is not None:
            return
        prefix = plan.prefix
        q = hidden.shape[1]
        cached = compat.past_length(call.get("past"), idx)
        width = prefix.valid.shape[1]
        if plan.raw_mask is not None:
            new_valid = plan.raw_mask[:, prefix.full_len:].bool()
        else:
            new_valid = torch.ones(hidden.shape[0], cached - width + q, dtype=torch.bool, device=hidden.device)
        if cached != width + new_valid.shape[1] - q:
            raise RuntimeError(
                f"meteor-plugin Stage 3: the KV cache of layer {idx} holds {cached} tokens but the pruned prefill "
                f"kept {width} and {new_valid.shape[1] - q} tokens were generated since; the cache was changed "
                "outside generate (beam search or cache reuse are not supported with the llm stage)"
            )
        key_valid = torch.cat([prefix.valid, new_valid], dim=1)
        kind = compat.mask_kind(self.model.config, call.get("attention_mask"))
        bias = _extended(prefix.bias, new_valid.shape[1])
        mask, plan.column = attention_bias.layer_mask(kind, new_valid[:, -q:], key_valid, hidden.dtype, bias)
        subs: Dict[str, Any] = {"attention_mask": mask}
        if call.get("cache_position") is not None:
            subs["cache_position"] = torch.arange(cached, cached + q, device=hidden.device)
        plan.subs = subs

    def _full_length_bias(self, plan: _Plan, idx: int, call: compat.LayerCall, hidden: torch.Tensor):
        """Proportional attention in a layer that runs on the whole sequence (before Stage 3's layer, or
        every layer without Stage 3): the layer's mask with each key's bias. None when there is no bias."""
        if plan.full_subs is None:
            plan.full_subs = self._full_length_mask(plan, idx, call, hidden)
        if not plan.full_subs:
            return None  # every token stands for itself here (no bias, or Stage 3 alone before its layer)
        for name, value in plan.full_subs.items():
            if call.has(name):
                call.set(name, value)
        args, kwargs = call.call_args()
        return args, kwargs, attention_bias.around(call, plan.full_column)

    def _full_length_mask(self, plan: _Plan, idx: int, call: compat.LayerCall, hidden: torch.Tensor) -> Dict[str, Any]:
        prefix = plan.prefix if plan.mode == "decode" else None
        bias = plan.key_bias if plan.mode == "prefill" else (prefix.full_bias if prefix is not None else None)
        if bias is None or not bool(bias.any()):
            return {}
        kind = compat.mask_kind(self.model.config, call.get("attention_mask"))
        if plan.mode == "prefill":
            mask, plan.full_column = attention_bias.layer_mask(kind, plan.valid, plan.valid, hidden.dtype, bias)
            return {"attention_mask": mask}
        q = hidden.shape[1]
        new = compat.past_length(call.get("past"), idx) + q - prefix.full_len
        new_valid = (plan.raw_mask[:, prefix.full_len:].bool() if plan.raw_mask is not None
                     else torch.ones(hidden.shape[0], new, dtype=torch.bool, device=hidden.device))
        key_valid = torch.cat([prefix.full_valid, new_valid], dim=1)
        mask, plan.full_column = attention_bias.layer_mask(kind, new_valid[:, -q:], key_valid, hidden.dtype,
                                                           _extended(bias, new))
        return {"attention_mask": mask}

    def positions_for(self, batch: int, length: int, past: Any, device: torch.device) -> Optional[torch.Tensor]:
        """The position ids of a forward under proportional attention (the unpruned ones), or None."""
        plan, prefix = self.plan, self.prefix
        if plan is not None and plan.mode == "prefill" and plan.layout is not None:
            return plan.layout.positions
        if plan is None or plan.mode != "decode" or prefix is None or prefix.next_position is None:
            return None
        done = compat.past_length(past, 0) - prefix.full_len  # tokens generated since the prefill
        steps = torch.arange(length, device=device) + done
        return prefix.next_position.to(device)[..., None] + steps

    # Labels ----------------------------------------------------------------------------------------------
    def compact_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels aligned with the compacted sequence of the last training forward."""
        plan = self.plan
        if plan is None or plan.mode != "prefill" or plan.index is None:
            return labels
        out = torch.gather(labels, 1, plan.index.to(labels.device))
        return out.masked_fill(~plan.kept_valid.to(labels.device), IGNORE_INDEX)


def _similarities(cfg: MeteorConfig, visual: torch.Tensor, normed: torch.Tensor) -> Optional[list]:
    """Each sample's ``core.coverage.region_similarity``, once, where the coverage signal and selection both use it."""
    if cfg.llm_budget_signal == "coverage" and cfg.llm_selection == "coverage":
        return similarities(visual, normed, cfg.llm_region_sharpness)
    return None


def _count_limit(cfg: MeteorConfig, entered: torch.Tensor) -> int:
    """Where the coverage count can stop: beyond ``llm_max_keep / llm_lambda`` the budget is clipped anyway (times
    the layers averaged: one layer's count at that limit makes their mean reach the clip whatever the others')."""
    hi = int(resolve_budget_per_sample(cfg.llm_max_keep, entered).max()) if entered.numel() else 0
    layers = cfg.llm_layer if cfg.llm_signal_layers == "up_to" else 1
    return int(layers * hi / cfg.llm_lambda) + 2


def _reads_early_signal(cfg: MeteorConfig, idx: int) -> bool:
    """Whether layer ``idx`` (before Stage 3's) adds its budget signal or attention to the means Stage 3 uses."""
    return "up_to" in (cfg.llm_signal_layers, cfg.llm_score_layers) and idx >= 1 and cfg.method != "fastv"


def _on_visual(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(B, L) attention renormalised over each row's visual tokens (0 elsewhere), so layers weigh alike."""
    w = scores.float().clamp(min=0) * visual
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-30)


def _absorbed_bias(bias: torch.Tensor, states: torch.Tensor, visual: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Key biases after Stage 3: each dropped visual token's size (exp of its bias) added to the kept visual
    token whose layer input is most like its own (``core/token_sizes.py``), over the visual tokens only."""
    sizes = absorbed_sizes(states, kept & visual, bias.exp(), valid=visual)
    out = torch.where(visual, sizes.clamp(min=1.0).log().to(bias.dtype), bias)
    return out.masked_fill(visual & ~kept, 0.0)  # dropped: never attended again


def _extended(bias: Optional[torch.Tensor], new: int) -> Optional[torch.Tensor]:
    """A prefill's key biases, with zeros for the ``new`` tokens generated since."""
    if bias is None:
        return None
    return torch.cat([bias, bias.new_zeros(bias.shape[0], new)], dim=1)


def _expanded(layout: Optional[VisualLayout], batch: int, length: int,
              raw: Optional[torch.Tensor]) -> Optional[VisualLayout]:
    """The layout of a prefill that generate expanded (``num_return_sequences``: each prompt repeated in a
    row, by every transformers generation) before its first forward; any other mismatch is left to fail."""
    if layout is None or layout.shape[1] != length or batch == layout.shape[0] or batch % layout.shape[0]:
        return layout
    grown = layout.repeated(batch // layout.shape[0])
    if raw is not None and not torch.equal(raw[:, -length:].bool().to(grown.valid.device), grown.valid):
        return layout  # not the expansion it looks like: the shape check refuses it by name
    return grown


def _refuse_pruned_cache(past: Any, layers: int) -> None:
    """A decoding step whose cache a Stage 3 prefill pruned, outside the call (generate) that made it."""
    lengths = {compat.past_length(past, i) for i in range(layers)}
    if len(lengths) > 1:
        raise NotImplementedError(
            "meteor-plugin Stage 3: this decoding step continues a KV cache that a pruned prefill left with "
            f"different lengths per layer ({sorted(lengths)}), outside the generate call that pruned it; decoding "
            "by hand across forward calls is not supported with the llm stage: use generate, or llm=False"
        )


_POSITIONS_MARK = "_meteor_unpruned_positions"


def _mark_cache(past: Any) -> None:
    """Mark the KV cache of a prefill whose tokens took their unpruned positions, so that a decoding step outside
    the call that made it is refused, not misplaced (a legacy tuple cache cannot carry the mark: compat)."""
    compat.mark_cache(past, _POSITIONS_MARK)


def _refuse_unpruned_positions(past: Any) -> None:
    if compat.cache_marked(past, _POSITIONS_MARK):
        raise NotImplementedError(
            "meteor-plugin: this decoding step continues a KV cache whose prefill ran with "
            "proportional attention (its tokens took their unpruned positions), outside the generate call that "
            "made it: the next positions are not known here. Use generate, or proportional_attention='off'"
        )


def _wrap_layer_forward(original: Any) -> Any:
    """The forward of a decoder-layer class: runs Stage 3 for the layers of the model a call is pruning."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        call = percall.current()
        pruner = call.decoder if call is not None else None
        step = None
        if pruner is not None and id(self) in pruner.layer_index:
            if pruner.plan is not None:
                step = (pruner, pruner.plan, pruner.layer_index[id(self)])
            if torch.is_tensor(hidden):
                percall.remember_step(call, self, hidden, step)
        elif torch.is_tensor(hidden):
            step = percall.recomputed_step(self, hidden)  # gradient checkpointing, in backward
        changed = step[0].layer_args(step[1], step[2], self, args, kwargs) if step is not None else None
        if changed is None:
            return original(self, *args, **kwargs)
        args, kwargs, floor = changed
        with floor:
            return original(self, *args, **kwargs)

    return forward


def wrap_model_forward(original: Any, registry: Any, config_for: Any) -> Any:
    """A replacement for ``LlamaModel.forward`` (on an adapter's subclass) that runs Stage 3."""
    signature = inspect.signature(original)
    slot = list(signature.parameters).index("position_ids") - 1  # in ``args`` (self is not there)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        cfg = config_for(self)
        if cfg is None:  # nothing prunes this model now: its last run (this one) has no stats
            percall.record_stats(self, None)
            return original(self, *args, **kwargs)
        call = percall.current()
        pruner = call.decoder
        if pruner is None or pruner.model is not self:
            pruner = call.decoder = DecoderPruner.attach(self, registry)
        layout, call.layout = call.layout, None
        embeds = arguments.get("inputs_embeds")
        ids = arguments.get("input_ids")
        ref = embeds if embeds is not None else ids
        pruner.begin(cfg, layout, ref.shape[0], ref.shape[1], arguments.get("attention_mask"),
                     arguments.get("past_key_values"), ref.device, unknown_visual=call.embeds_from_elsewhere)
        positions = pruner.positions_for(ref.shape[0], ref.shape[1], arguments.get("past_key_values"), ref.device)
        if positions is None:
            return original(self, *args, **kwargs)
        # Proportional attention: the positions the tokens have unpruned.
        if len(args) > slot:
            args = args[:slot] + (positions,) + args[slot + 1:]
        else:
            kwargs["position_ids"] = positions
        out = original(self, *args, **kwargs)
        _mark_cache(getattr(out, "past_key_values", None))
        return out

    return forward


def patch_language_model(cls: type, registry: Any) -> None:
    """Make a language model class run Stage 3, only inside a call that a multimodal model started and only for
    that call's language model (``MeteorCall.language_model``, with ``language_config``): a text-only model of
    the same class, or any forward outside such a call, runs as it is. For families whose language model is a
    module of its own (transformers' LLaVA classes)."""
    if registry.is_patched(cls, "forward"):
        return
    original = cls.forward
    pruned = wrap_model_forward(original, registry, lambda lm: percall.current().language_config)  # set: pruning

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        call = percall.current()
        if call is None or call.language_model is not self:
            percall.record_stats(self, None)  # a run that prunes nothing leaves no stats behind
            return original(self, *args, **kwargs)
        return pruned(self, *args, **kwargs)

    registry.patch(cls, "forward", forward)
