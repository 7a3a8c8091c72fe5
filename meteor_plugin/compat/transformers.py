"""What differs between the transformers generations we support: 4.37 (LLaVA's pin), 4.44 (EAGLE's
pin) and 5.x. Everything version-specific lives here; the stages ask this module, never the version.

Differences handled:
- the version check at ``enable`` (an untested version is an error unless explicitly allowed);
- decoder-layer call arguments (``past_key_value`` vs ``past_key_values``, ``position_embeddings``
  and ``cache_position`` present or not, positional calls under gradient checkpointing);
- rotary embeddings: 4.37 computes them inside attention from a length that a compacted layer
  understates, so its rotary table gets a floor; later versions pass (cos, sin) per token;
- attention-mask formats per attention implementation;
- the causal-LM loss, and LLaVA's forward rejecting ``cache_position`` on 4.38-5.3.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

# (low, high) inclusive ranges of transformers versions the test matrix covers.
SUPPORTED_RANGES = (((4, 37, 2), (4, 37, 2)), ((4, 44, 2), (4, 44, 2)), ((5, 0, 0), (5, 23, 0)))
SUPPORTED_TEXT = "4.37.2 (LLaVA's pin), 4.44.2 (EAGLE's pin) or 5.0-5.23.0"


class UnsupportedVersionError(RuntimeError):
    pass


def _parse(version: str) -> Tuple[int, int, int]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
        if not piece.isdigit():
            break
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def transformers_version() -> Tuple[int, int, int]:
    import transformers

    return _parse(transformers.__version__)


def is_supported(version: Tuple[int, int, int]) -> bool:
    return any(lo <= version <= hi for lo, hi in SUPPORTED_RANGES)


def check_version(allow_untested: bool = False) -> None:
    import transformers

    version = _parse(transformers.__version__)
    if is_supported(version):
        return
    message = (
        f"meteor-plugin is tested with transformers {SUPPORTED_TEXT}; this environment has "
        f"transformers {transformers.__version__}."
    )
    if not allow_untested:
        raise UnsupportedVersionError(
            message + " Install a supported version, or pass enable(..., allow_untested_transformers=True) "
            "(or set METEOR_ALLOW_UNTESTED_TRANSFORMERS=1) to try it anyway."
        )
    warnings.warn(message + " Running anyway because untested versions were explicitly allowed.", stacklevel=3)


def generation() -> str:
    """'4.37' for the 4.3x-4.42 API (rotary inside attention), '4.44' for 4.43-4.5x, '5' for 5.x."""
    major, minor, _ = transformers_version()
    if major >= 5:
        return "5"
    return "4.37" if minor < 43 else "4.44"


# Decoder-layer calls ------------------------------------------------------------------------------
_SIGNATURES: Dict[type, inspect.Signature] = {}


class LayerCall:
    """The arguments of one decoder-layer call, by name, whatever way they were passed."""

    def __init__(self, layer: torch.nn.Module, args: tuple, kwargs: dict):
        cls = type(layer)
        sig = _SIGNATURES.get(cls)
        if sig is None:
            sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
        self._bound = sig.bind(layer, *args, **kwargs)
        self.cache_name = "past_key_values" if "past_key_values" in sig.parameters else "past_key_value"

    def get(self, name: str, default: Any = None) -> Any:
        if name == "past":
            name = self.cache_name
        if name in self._bound.arguments:
            return self._bound.arguments[name]
        extra = self._bound.arguments.get("kwargs")
        if isinstance(extra, dict) and name in extra:
            return extra[name]
        return default

    def has(self, name: str) -> bool:
        return name in self._bound.signature.parameters or name in (self._bound.arguments.get("kwargs") or {})

    def set(self, name: str, value: Any) -> None:
        if name in self._bound.signature.parameters:
            self._bound.arguments[name] = value
        else:
            self._bound.arguments.setdefault("kwargs", {})[name] = value

    def call_args(self) -> Tuple[tuple, dict]:
        args = self._bound.args[1:]  # drop self
        return args, dict(self._bound.kwargs)


def past_length(past: Any, layer_idx: int = 0) -> int:
    """Tokens already cached for one layer: works for None, legacy tuples and Cache objects."""
    if past is None:
        return 0
    if isinstance(past, (tuple, list)):
        if len(past) <= layer_idx or past[layer_idx] is None or len(past[layer_idx]) == 0:
            return 0
        return int(past[layer_idx][0].shape[-2])
    try:
        return int(past.get_seq_length(layer_idx))
    except (IndexError, TypeError):
        return 0


def cache_bytes(past: Any) -> int:
    """Bytes held by a KV cache's key and value tensors: legacy tuples, and Cache objects of 4.37-4.44
    (``key_cache``/``value_cache`` lists) and 5.x (``layers`` with ``keys``/``values``)."""
    if past is None:
        return 0
    if torch.is_tensor(past):
        return past.numel() * past.element_size()
    if isinstance(past, (tuple, list)):
        return sum(cache_bytes(item) for item in past)
    if hasattr(past, "layers"):
        return sum(cache_bytes(getattr(layer, "keys", None)) + cache_bytes(getattr(layer, "values", None))
                   for layer in past.layers)
    if hasattr(past, "key_cache"):
        return cache_bytes(list(past.key_cache)) + cache_bytes(list(past.value_cache))
    raise TypeError(f"meteor-plugin cannot read the size of a {type(past).__name__} KV cache")


# Vision towers --------------------------------------------------------------------------------------------
def clip_layers(clip: torch.nn.Module):
    """A CLIP (or SigLIP) vision model's encoder blocks: ``vision_model.encoder.layers`` in transformers 4.x,
    ``encoder.layers`` in 5.x."""
    inner = getattr(clip, "vision_model", clip)
    return inner.encoder.layers


# Rotary embeddings ----------------------------------------------------------------------------------
def rope_cos_sin(layer: torch.nn.Module, call: LayerCall, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (B, L, d) for the tokens of this layer call, at their real positions."""
    pe = call.get("position_embeddings")
    if pe is not None:
        cos, sin = pe
        return cos, sin
    position_ids = call.get("position_ids")
    attn = layer.self_attn
    if position_ids is None:
        raise RuntimeError("meteor-plugin: the decoder layer got neither position_embeddings nor position_ids")
    rotary = getattr(attn, "rotary_emb", None)
    if rotary is None:
        raise RuntimeError(
            f"meteor-plugin: {type(attn).__name__} has no rotary_emb and the layer got no position_embeddings"
        )
    if "position_ids" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, position_ids)  # 4.38-4.47 layers that compute their own (Mistral in 4.44)
    need = int(position_ids.max().item()) + 1
    cos, sin = rotary(hidden, seq_len=need)  # 4.37: tables indexed by position
    return cos[position_ids], sin[position_ids]


_ROTARY_FLOOR: contextvars.ContextVar[int] = contextvars.ContextVar("meteor_rotary_floor", default=0)


def patch_rotary_floor(registry: Any) -> None:
    """4.37 only: let a compacted layer ask the rotary table for positions past its own length.

    4.37's attention asks ``rotary_emb(v, seq_len=kv_len)`` and indexes the table by position id; a
    compacted layer keeps the original (larger) ids with a shorter kv_len. The patched forward returns
    at least as many rows as the floor that ``rotary_floor`` sets around that layer's call (a context
    variable, so threads and calls never see each other's); with no floor it behaves exactly like the original.
    """
    if generation() != "4.37":
        return
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral

    for cls in (modeling_llama.LlamaRotaryEmbedding, modeling_mistral.MistralRotaryEmbedding):
        if not registry.is_patched(cls, "forward"):
            registry.patch(cls, "forward", _floored(cls.forward))


def _floored(original: Callable) -> Callable:
    def forward(self, x, seq_len=None):
        floor = _ROTARY_FLOOR.get()
        if seq_len is not None and floor > seq_len:
            seq_len = floor
        return original(self, x, seq_len=seq_len)

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def rotary_floor(call: LayerCall) -> Iterator[None]:
    """Around one compacted layer's call: the rotary table covers its largest position id (4.37)."""
    position_ids = call.get("position_ids")
    if generation() != "4.37" or position_ids is None:
        yield
        return
    token = _ROTARY_FLOOR.set(int(position_ids.max().item()) + 1)
    try:
        yield
    finally:
        _ROTARY_FLOOR.reset(token)


# Attention masks ----------------------------------------------------------------------------------------
MASK_2D = "2d"
MASK_BOOL = "bool4d"
MASK_ADDITIVE = "additive4d"
_FLASH_PREFIXES = ("flash_attention", "kernels-community/flash", "kernels-community/vllm-flash")


def flash_attention_2_available() -> bool:
    """Whether FlashAttention-2 can run here (the flash-attn package and a CUDA GPU)."""
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def attn_implementation(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def mask_kind(config: Any, incoming: Optional[torch.Tensor]) -> str:
    """The mask format the layers expect: the incoming mask's own format when there is one."""
    if incoming is not None and torch.is_tensor(incoming):
        if incoming.dim() == 2:
            return MASK_2D
        return MASK_BOOL if incoming.dtype == torch.bool else MASK_ADDITIVE
    impl = attn_implementation(config)
    registered = _registered_mask_kind(impl)
    if registered is not None:
        return registered
    if impl.startswith(_FLASH_PREFIXES):
        return MASK_2D
    if impl == "sdpa":
        return MASK_BOOL
    if impl == "eager":
        return MASK_ADDITIVE
    raise NotImplementedError(
        f"meteor-plugin Stage 3 supports the eager, sdpa and flash_attention_2 attention implementations; "
        f"this model uses {impl!r}. Load it with attn_implementation='sdpa' or disable the llm stage."
    )


def _registered_mask_kind(impl: str) -> Optional[str]:
    """transformers 5 maps each attention implementation (custom ones too) to a mask builder."""
    try:
        from transformers import masking_utils
    except ImportError:
        return None
    builder = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", {}).get(impl) if impl else None
    kinds = {"flash_attention_mask": MASK_2D, "sdpa_mask": MASK_BOOL, "eager_mask": MASK_ADDITIVE}
    return kinds.get(getattr(builder, "__name__", None))


def build_mask(kind: str, query_valid: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype,
               key_bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A causal mask for a compacted layout.

    query_valid: (B, Q) the queries are the last Q keys; key_valid: (B, K). Key j is visible to query i
    when it is valid and not after it. A padded query sees only itself, so no row is empty (an empty
    row would give NaN that then leaks through the padded values). ``key_bias`` (B, K), added to every
    query's logit of key j, makes the mask additive whatever ``kind`` (FlashAttention takes none).
    """
    b, q = query_valid.shape
    k = key_valid.shape[1]
    if key_bias is not None and kind == MASK_2D:
        raise NotImplementedError(
            "meteor-plugin: proportional attention adds a bias to the attention logits, which FlashAttention-2 "
            "cannot take: load the model with attn_implementation='sdpa' (or 'eager'), or set "
            "MeteorConfig.proportional_attention='off'"
        )
    if kind == MASK_2D:
        # Always a mask: with none, FlashAttention reads gaps in the kept position ids as packed sequences.
        return key_valid.long()
    qi = torch.arange(q, device=key_valid.device) + (k - q)
    kj = torch.arange(k, device=key_valid.device)
    causal = kj[None, :] <= qi[:, None]  # (Q, K)
    visible = causal[None] & key_valid[:, None, :] & query_valid[:, :, None]
    visible = visible | (kj[None, None, :] == qi[None, :, None])
    visible = visible[:, None]  # (B, 1, Q, K)
    if kind == MASK_BOOL and key_bias is None:
        return visible
    out = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    if key_bias is not None:
        out = out + key_bias.to(device=out.device, dtype=dtype)[:, None, None, :]
    return out.masked_fill(~visible, torch.finfo(dtype).min)


# KV caches ------------------------------------------------------------------------------------------------
def mark_cache(past: Any, name: str) -> None:
    """Set flag ``name`` on a KV cache object, the request's own data (as the cache is). Legacy tuple caches (what
    transformers 4.37 and 4.44 return to a caller that passed none) cannot carry one: nothing is set."""
    if past is not None and not isinstance(past, (tuple, list)):
        try:
            setattr(past, name, True)
        except AttributeError:
            pass


def cache_marked(past: Any, name: str) -> bool:
    return bool(getattr(past, name, False))


# Loss and forward signatures ------------------------------------------------------------------------------
def causal_lm_loss(model: Any, logits: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The loss ``LlamaForCausalLM.forward`` would compute for these logits and labels."""
    if generation() == "5":
        return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kwargs)
    shift_logits = logits[..., :-1, :].contiguous().float()
    shift_labels = labels[..., 1:].contiguous().to(shift_logits.device)
    return F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1), ignore_index=-100)


def accepted_kwargs(fn: Callable) -> Optional[set]:
    """Names a function accepts, or None if it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def save_tokenizer_portable(tokenizer: Any, folder: str) -> str:
    """``tokenizer.save_pretrained(folder)`` in a form every supported version loads: transformers 5
    records its own backend class name, which 4.x cannot resolve; all know PreTrainedTokenizerFast."""
    import json
    import os

    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return folder


class _DropNotice:
    """A logging filter that drops records containing one of ``needles``."""

    def __init__(self, *needles: str) -> None:
        self.needles = needles

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


TORCHVISION_NOTICE = "requires torchvision (not installed); falling back to"


def quiet_cli_notices() -> None:
    """For the command-line tools: drop transformers 5's notice that an image processor falls back to its PIL
    class without torchvision. That fallback is what this package uses on purpose (torchvision is not a
    dependency), and a user reads the notice, printed by every command, as a failure. Library users keep it."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # configures the library's handler
    root = hf_logging._get_library_root_logger()
    for handler in root.handlers:
        if not any(isinstance(f, _DropNotice) for f in handler.filters):
            handler.addFilter(_DropNotice(TORCHVISION_NOTICE))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Around a load whose weights this package checks itself (or a model built in memory): no progress bars
    ("Writing model shards", "Loading weights") and no load report, whose UNEXPECTED/MISSING rows would name
    weights the plugin loads on its own. Restores the verbosity and the bars afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
