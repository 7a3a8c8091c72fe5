"""transformers' tensor parallelism (5.x: ``from_pretrained(..., tp_plan="auto")`` or a ``DistributedConfig``), as
Stage 3 needs to know it: which parallel style transformers' plan put on a module, and which styles keep what Stage 3
relies on. transformers 4.37 and 4.44 have no tensor-parallel plans: there no module carries a style.

``apply_tensor_parallelism`` (transformers 5.x) replaces the ``forward`` of every module its plan names with one that
closes over the style object (a ``TensorParallelLayer``), or, for styles that install their own, a function named
after the style's class; that is how a style is recognised here, from the module, whoever resolved the plan (the
model's ``base_model_tp_plan``, a user's override, or a wrapper).

What Stage 3 relies on, in every decoder layer: the layer's input holds every token of the sequence on every rank
(replicated), and ``q_proj``/``k_proj`` give whole attention heads (all of them, or this rank's slice of them).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

# Styles (by class name) that keep each token's whole computation on every rank: they shard weights along the hidden,
# head, vocabulary or expert dimension and reduce or gather what they shard, so a shorter sequence runs as well.
TOKENWISE = frozenset({
    "ColwiseParallel", "RowwiseParallel", "EmbeddingParallel", "PackedColwiseParallel", "PackedRowwiseParallel",
    "MoeExpertsParallel", "MoeIdentityParallel", "ReplicatedWithGradAllReduce", "AllReduceParallel",
    "LocalParamsParallel", "TensorParallelLayer",
})
# Styles of q_proj/k_proj under which their output is whole heads: this rank's slice of them (colwise) or all of
# them (colwise_gather_output, colwise_rep; "replicate" leaves the module as it is).
HEADWISE = frozenset({"ColwiseParallel", "TensorParallelLayer"})
# Styles Stage 3 cannot run under, and what they are.
REFUSED = {
    "SequenceParallel": "sequence parallelism (the layer's input is split along the sequence across the ranks)",
    "MlaKvAProjParallel": "multi-head latent attention's projections",
}


def installed_style(module: Any) -> Optional[str]:
    """The class name of the tensor-parallel style transformers installed on ``module``, or None (none installed)."""
    forward = _installed_forward(module)
    if forward is None:
        return None
    style = _style_object(module)
    if style is not None:
        return type(style).__name__
    owner = getattr(forward, "__qualname__", "").split(".")[0]  # a style that installs a forward of its own
    return owner or type(forward).__name__


def installed_mesh(module: Any) -> Any:
    """The device mesh the style on ``module`` was installed with (its tensor-parallel ranks), or None."""
    return _closed_over(module, lambda value: type(value).__name__ == "DeviceMesh")


def _style_object(module: Any) -> Any:
    return _closed_over(module, lambda value: any(c.__name__ == "TensorParallelLayer" for c in type(value).__mro__))


def _installed_forward(module: Any) -> Any:
    """The ``forward`` transformers set on this module (not its class's), or None."""
    if not getattr(module, "_is_hooked", False):
        return None
    return getattr(module, "__dict__", {}).get("forward")


def _closed_over(module: Any, wanted: Any) -> Any:
    """The first value the installed ``forward`` closes over that ``wanted`` accepts, or None."""
    for cell in getattr(_installed_forward(module), "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if wanted(value):
            return value
    return None


def _splits_tokens(module: Any) -> bool:
    """Whether the style on ``module`` lays its input or output out split along the batch or the sequence
    (dimension 0 or 1 of a (B, L, D) activation) rather than replicated or split along the features."""
    style = _style_object(module)
    for name in ("input_layouts", "output_layouts"):
        layouts = getattr(style, name, None)
        for placement in layouts if isinstance(layouts, (tuple, list)) else (layouts,):
            dim = getattr(placement, "dim", None)
            if type(placement).__name__ == "Shard" and dim in (0, 1):
                return True
    return False


def styles(model: Any) -> Iterator[Tuple[str, Any, str]]:
    """(name, module, style) of every module of ``model`` that carries a tensor-parallel style."""
    for name, module in model.named_modules():
        style = installed_style(module)
        if style is not None:
            yield name, module, style


def refusal(name: str, module: Any, style: str) -> Optional[str]:
    """Why Stage 3 cannot run with ``style`` on the module at ``name`` of a decoder, or None when it can."""
    if style in REFUSED:
        return f"{name} runs under {REFUSED[style]} ({style})"
    if style not in TOKENWISE:
        return f"{name} runs under the tensor-parallel style {style}, which meteor-plugin does not recognise"
    if _splits_tokens(module):
        return f"{name} runs under {style} with its activations split along the batch or the sequence"
    if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj") and style not in HEADWISE:
        return f"{name} runs under {style}, whose output is not whole attention heads"
    return None



def unavailable() -> Optional[str]:
    """Why this environment cannot load a model tensor-parallel (None when it can): transformers 4.37 and 4.44
    have no ``tp_plan``; 5.x loads with ``distributed_config=DistributedConfig(tp_plan="auto")``."""
    import torch
    import transformers

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "torch.distributed with gloo is not available"
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        return (f"transformers {transformers.__version__} has no tensor-parallel loading (from_pretrained(..., "
                "tp_plan=...) arrived after 4.44; transformers 5.x has it)")
    return None
