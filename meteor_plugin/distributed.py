"""Process-group and ZeRO-3 helpers that training and the families' training hooks share.

Nothing here knows a model family or a trainer: which rank this is, a barrier, full copies of parameters that
ZeRO-3 partitions across ranks, and partitioning parameters created after ``zero.Init`` the way DeepSpeed's
engine does. DeepSpeed is imported only where a parameter is really partitioned (``ds_id``).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Tuple

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def zero3_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters of ``module`` that ZeRO-3 partitions (each rank holds a slice; ``.data`` is empty)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(params: List[torch.nn.Parameter]) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned ``params`` hold their full values on every rank (every rank must
    enter it); with no partitioned parameter it does nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    from deepspeed import zero

    with zero.GatheredParameters(partitioned):
        yield


def gathered_cpu(named: Iterable[Tuple[str, torch.nn.Parameter]]) -> Dict[str, torch.Tensor]:
    """Full CPU copies of parameters, gathering ZeRO-3 partitions (every rank must call this)."""
    named = list(named)
    with gathered([p for _, p in named]):
        return {name: p.data.detach().cpu().clone() for name, p in named}


def partition_like(reference: List[torch.nn.Parameter], new: List[torch.nn.Parameter]) -> None:
    """Partition parameters created after ``zero.Init`` the way DeepSpeed's engine does with late parameters
    (rank 0's values are broadcast first), when ``reference`` (partitioned parameters) shows ZeRO-3 is on."""
    if reference:
        reference[0].convert_to_zero_parameters(param_list=new)
