"""The language-model half of the tiny test models: one spec and one config for LLaVA and EAGLE alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List


@dataclass
class TinyLlm:
    llm_hidden: int = 64
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2  # GQA on purpose
    llm_intermediate: int = 128
    vocab_size: int = 256
    max_positions: int = 2048
    attn_implementation: str = "sdpa"
    padding_side: str = "right"
    seed: int = 0


def llm_config_kwargs(spec: TinyLlm) -> Dict[str, Any]:
    """Llama config fields (pad 0, bos 1, eos 2) plus the padding side LLaVA/EAGLE re-pad on."""
    return dict(
        vocab_size=spec.vocab_size, hidden_size=spec.llm_hidden, intermediate_size=spec.llm_intermediate,
        num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=spec.max_positions, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tokenizer_padding_side=spec.padding_side,
    )


def input_lengths(modules, fn) -> Dict[int, List[int]]:
    """Run ``fn`` and return, for each of ``modules`` (by index), the sequence length of its input at every call:
    what a decoder layer really ran on, measured with hooks rather than read from the plugin's stats."""
    seen: Dict[int, List[int]] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, []).append(inp[0].shape[1]))
               for i, m in enumerate(modules)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen
