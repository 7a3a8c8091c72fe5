"""Analytic FLOPs of a LLaVA-family prefill (2 FLOPs per multiply-add; matmuls only, which dominate).

Counts what the code computes: full (not causally halved) attention score matrices, logits for every
position, and for Stage 3 the extra scoring work (k over the whole sequence, q over the query tokens,
their score rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence


@dataclass
class LlmShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "LlmShape":
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
        )


def llm_layer_flops(shape: LlmShape, tokens: int) -> float:
    d, hd = shape.hidden, shape.head_dim
    proj = 2 * tokens * d * (shape.heads * hd * 2 + shape.kv_heads * hd * 2)  # q, o and k, v
    scores = 2 * 2 * shape.heads * tokens * tokens * hd  # q k^T and a v
    mlp = 2 * tokens * 3 * d * shape.intermediate
    return float(proj + scores + mlp)


def scoring_flops(shape: LlmShape, tokens: int, queries: int) -> float:
    d, hd = shape.hidden, shape.head_dim
    return float(2 * tokens * d * shape.kv_heads * hd + 2 * queries * d * shape.heads * hd
                 + 2 * shape.heads * queries * tokens * hd)


def vit_flops(tokens: int, hidden: int, layers: int, intermediate: int) -> float:
    per_layer = 2 * tokens * 4 * hidden * hidden + 2 * 2 * tokens * tokens * hidden + 2 * tokens * 2 * hidden * intermediate
    return float(layers * per_layer)


def prefill_flops(shape: LlmShape, layer_tokens: Sequence[int], logits_tokens: int, vision: float,
                  projector: float, scoring: float = 0.0) -> Dict[str, float]:
    llm = sum(llm_layer_flops(shape, n) for n in layer_tokens)
    head = 2.0 * logits_tokens * shape.hidden * shape.vocab
    total = vision + projector + llm + head + scoring
    return {"vision": vision, "projector": projector, "llm_layers": llm, "lm_head": head, "scoring": scoring,
            "total": total}
