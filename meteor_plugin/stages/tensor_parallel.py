"""Stage 3 under tensor parallelism (transformers' ``tp_plan``): the same tokens kept on every rank.

Under a tensor-parallel plan each rank holds a slice of every layer's attention heads (``q_proj`` and ``k_proj``
split by output columns) and every rank sees the whole sequence (the row-split projections all-reduce their
outputs). Stage 3 scores from each rank's own heads, gathers the score rows of all heads across the tensor-parallel
group (so the top heads are chosen among all of them, and every rank then holds the same rows, the same token scores
and the same budget signal), and every rank keeps the tokens the group's first rank selected: a broadcast of the
decision, so that a kernel that rounds differently on one rank can never make the ranks' sequences (and with them
every later collective) disagree. Each rank's KV cache holds its own heads of the kept tokens.

Checked at each prefill: the ranks were given the same input and layout (otherwise their activations would mix
silently), and the plan is one Stage 3 can run under (``compat/tensor_parallel.py``; sequence parallelism and styles
it does not know are refused by name). Everything here is a no-op for a model that is not tensor-parallel.
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..compat import tensor_parallel as compat_tp


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a language model's layers run over."""

    group: Any  # torch.distributed process group
    size: int
    rank: int  # this rank's place in the group: its heads are the rank-th slice of them


_LAYOUTS: "weakref.WeakKeyDictionary[Any, Tuple[Optional[TensorParallel], List[str]]]" = weakref.WeakKeyDictionary()


def of_module(module: Any) -> Optional[TensorParallel]:
    """The group of the tensor-parallel style on ``module``, or None (not tensor-parallel)."""
    mesh = compat_tp.installed_mesh(module)
    if mesh is None:
        return None
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"meteor-plugin Stage 3: {type(module).__name__} is tensor-parallel over a {mesh.ndim}-D device mesh "
            f"{tuple(mesh.mesh_dim_names or ())}; it runs over a 1-D tensor-parallel mesh only")
    import torch.distributed as dist

    group = mesh.get_group()
    rank = mesh.get_local_rank()
    if dist.get_rank(group) != rank:  # the heads' slice order must be the order all_gather returns
        raise NotImplementedError(
            f"meteor-plugin Stage 3: rank {dist.get_rank()} is rank {dist.get_rank(group)} of its tensor-parallel "
            f"group but holds slice {rank} of the heads; it needs the group's ranks in the mesh's order")
    return TensorParallel(group, mesh.size(), rank)


def layout(model: Any) -> Tuple[Optional[TensorParallel], List[str]]:
    """The tensor-parallel group of a decoder's attention (None when it is not tensor-parallel) and what in its plan
    Stage 3 cannot run under (module and style, one line each). Kept per model: it is the model's structure."""
    known = _LAYOUTS.get(model)
    if known is not None:
        return known
    problems: List[str] = []
    for name, module, style in compat_tp.styles(model):
        why = compat_tp.refusal(re.sub(r"\.\d+\.", ".*.", name), module, style)  # once for all layers
        if why is not None and why not in problems:
            problems.append(why)
    layers = getattr(model, "layers", None) or []
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    group = of_module(attn.q_proj) if attn is not None and hasattr(attn, "q_proj") else None
    known = _LAYOUTS[model] = (group, problems)
    return known


def refuse_pipeline(layers: Any) -> None:
    """Refuse by name a decoder whose layers transformers' pipeline parallelism gave to other ranks."""
    skipped = [i for i, layer in enumerate(layers) if type(layer).__name__ == "PipelineIdentityLayer"]
    if skipped:
        raise NotImplementedError(
            f"meteor-plugin Stage 3: decoder layers {skipped} run on other ranks (pipeline parallelism, pp_size > 1), "
            "which the plugin does not support; tensor parallelism (tp_plan='auto') is")


def refuse_sharded(blocks: Any, what: str) -> None:
    """Refuse by name a tensor-parallel style anywhere in ``blocks`` (a vision tower's): ``what`` scores their tokens
    from every head's attention, which it finds whole on every rank only (transformers' plans replicate the towers)."""
    for index, block in enumerate(blocks):
        for name, module, style in compat_tp.styles(block):
            raise NotImplementedError(
                f"meteor-plugin {what}: {name or type(module).__name__} of encoder block {index} is tensor-parallel "
                f"({style}); {what} runs on a vision tower that every rank holds whole, as the models' own plans "
                "(tp_plan='auto') leave it")


def prefill(model: Any, cfg: Any, changes_layers: bool, valid: torch.Tensor,
            visual: Optional[torch.Tensor]) -> Optional[TensorParallel]:
    """At each prefill: the model's tensor-parallel group (None without one), after refusing a plan that Stage 3 (or
    the masks of proportional attention, ``changes_layers``) cannot run under, and checking that every rank of the
    group was given the same input, layout and config."""
    group, problems = layout(model)
    if changes_layers and problems:
        raise NotImplementedError(
            f"meteor-plugin Stage 3 cannot run on this tensor-parallel {type(model).__name__}: " + "; ".join(problems)
            + ". Load it with tp_plan='auto' (the model's own plan), or set llm=False")
    if group is not None:
        _same_everywhere(group, cfg, valid, visual)
    return group


def _same_everywhere(tp: TensorParallel, cfg: Any, valid: torch.Tensor, visual: Optional[torch.Tensor]) -> None:
    import torch.distributed as dist

    at = torch.arange(valid.shape[1], dtype=torch.long, device=valid.device)
    visual = visual if visual is not None else torch.zeros_like(valid)
    settings = json.dumps(cfg.to_dict(), sort_keys=True, default=str) if hasattr(cfg, "to_dict") else repr(cfg)
    mine = torch.tensor([valid.shape[0], valid.shape[1], int(valid.sum()), int((valid.long() * at).sum()),
                         int(visual.sum()), int((visual.long() * at).sum()), zlib.crc32(settings.encode())],
                        dtype=torch.long, device=valid.device)  # NCCL exchanges only tensors on its GPU
    every = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(every, mine, group=tp.group)
    if any(not torch.equal(other, every[0]) for other in every):
        raise RuntimeError(
            "meteor-plugin: the ranks of a tensor-parallel group were given different inputs, visual layouts or "
            "configs (batch, length, tokens, visual tokens, config checksum per rank: "
            f"{[e.tolist() for e in every]}); tensor parallelism needs the same call on every rank")


def local_heads(attn: Any, q_width: int, k_width: int, dims: Dict[str, int]) -> Tuple[int, int]:
    """The (query, key) heads this rank's ``q_proj``/``k_proj`` outputs hold: all of them, or this rank's slice."""
    head_dim, heads, kv_heads = dims["head_dim"], dims["heads"], dims["kv_heads"]
    if (q_width, k_width) == (heads * head_dim, kv_heads * head_dim):
        return heads, kv_heads
    tp = of_module(attn.q_proj)
    size = tp.size if tp is not None else 1
    if q_width * size != heads * head_dim or k_width * size != kv_heads * head_dim or q_width % head_dim \
            or k_width % head_dim:
        raise NotImplementedError(
            f"meteor-plugin Stage 3: q_proj/k_proj give {q_width}/{k_width} features on this rank, not whole heads "
            f"of {heads} query and {kv_heads} key heads of {head_dim} split over {size} rank(s): the heads must "
            "divide evenly across the tensor-parallel ranks")
    return q_width // head_dim, k_width // head_dim


def all_heads(attn: Any, rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, L) score rows of every head from this rank's (B, H / ranks, L): gathered across the tensor-parallel
    group in the heads' order; the rows as they are when they hold every head already."""
    if rows.shape[1] == heads:
        return rows
    import torch.distributed as dist

    tp = of_module(attn.q_proj)
    every = [torch.empty_like(rows) for _ in range(tp.size)]
    dist.all_gather(every, rows.contiguous(), group=tp.group)
    return torch.cat(every, dim=1)


def agree(tp: Optional[TensorParallel], tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` as the group's first rank has it (a selection every rank must share), or as it is without a group."""
    if tp is None or tensor is None:
        return tensor
    import torch.distributed as dist

    out = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.clone()
    dist.broadcast(out, group=tp.group, group_src=0)
    return out.bool() if tensor.dtype == torch.bool else out
