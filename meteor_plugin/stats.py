"""Per-forward statistics: visual tokens entering and leaving each stage, per sample, and the
sequence length every decoder layer saw. Filled during the last prefill (or training forward)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

STAGES = ("encoder", "fusion", "llm")
UNKNOWN_VISUAL = (
    "inputs_embeds were not built by prepare_inputs_labels_for_multimodal for this forward (or were changed "
    "since): which tokens are visual is unknown, so no stage ran on them"
)


@dataclass
class StageCount:
    entered: int
    left: int
    detail: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"in": self.entered, "out": self.left, **self.detail}


@dataclass
class RunStats:
    batch_size: int
    stages: List[Dict[str, StageCount]] = field(default_factory=list)  # per sample: stage -> counts
    layer_seq_len: List[int] = field(default_factory=list)  # padded length each decoder layer saw
    layer_tokens: List[List[int]] = field(default_factory=list)  # per layer, per sample: valid tokens
    notes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            self.stages = [{} for _ in range(self.batch_size)]

    def set_stage(self, stage: str, entered: torch.Tensor, left: torch.Tensor, **detail: Any) -> None:
        """entered/left: (B,) counts; detail values may be (B,) tensors or lists (stored per sample)."""
        entered_l = [int(x) for x in entered.tolist()]
        left_l = [int(x) for x in left.tolist()]
        for i in range(self.batch_size):
            extra = {}
            for key, value in detail.items():
                v = value[i]
                extra[key] = v.tolist() if torch.is_tensor(v) else v
            self.stages[i][stage] = StageCount(entered_l[i], left_l[i], extra)

    def record_layer(self, index: int, seq_len: int, tokens: List[int]) -> None:
        while len(self.layer_seq_len) <= index:
            self.layer_seq_len.append(0)
            self.layer_tokens.append([])
        self.layer_seq_len[index] = seq_len
        self.layer_tokens[index] = tokens

    def visual_tokens(self, stage: str) -> List[Optional[int]]:
        """Tokens that left ``stage`` per sample (None where the stage did not run)."""
        return [s[stage].left if stage in s else None for s in self.stages]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "samples": [{k: v.to_dict() for k, v in s.items()} for s in self.stages],
            "layer_seq_len": list(self.layer_seq_len),
            "layer_tokens": [list(t) for t in self.layer_tokens],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        lines = []
        for i, sample in enumerate(self.stages):
            parts = [f"{stage} {c.entered}->{c.left}" for stage, c in sample.items()]
            empty = "visual tokens unknown" if UNKNOWN_VISUAL in self.notes else "no visual tokens"
            lines.append(f"sample {i}: " + (", ".join(parts) if parts else empty))
        if self.layer_seq_len:
            lines.append("decoder layer lengths: " + " ".join(str(n) for n in self.layer_seq_len))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def stats(model: Any) -> Optional[RunStats]:
    """Statistics of the last prefill of ``model`` (any wrapper of it) run by the calling thread.

    None before the first one, and after ``meteor_plugin.disable()`` (which forgets every run).
    """
    from .percall import last_stats

    for module in model.modules() if hasattr(model, "modules") else [model]:
        found = last_stats(module)
        if found is not None:
            return found
    return None
