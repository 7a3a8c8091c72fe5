"""METEOR's training options: taken out of argv before upstream's parser runs, and shown in its --help.

Upstream ``train()`` parses ``sys.argv`` with ``HfArgumentParser((ModelArguments, DataArguments,
TrainingArguments))``, which rejects unknown flags. ``pop_options`` removes METEOR's flags first (both
``--meteor-x`` and ``--meteor_x`` spellings); ``with_meteor_fields`` gives upstream's ``ModelArguments``
the same fields so that ``--help`` lists them. ``with_cpu_setup`` extends ``TrainingArguments`` with what a
CPU run needs right after parsing (``deepspeed.py``).
"""

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..entry import OPTIONS as ENABLE_OPTIONS
from ..entry import pop_options as pop_enable_options

ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass
class MeteorOptions:
    """What the METEOR flags say (None: not given)."""

    config: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    codebase: str = "auto"
    off: bool = False


# The options every patched entry point takes (entry.py), plus the training entry's own.
TRAINING_OPTIONS: Tuple[Tuple[str, bool, str], ...] = (
    ("attn", True, "attention implementation of the language model: sdpa (default), flash_attention_2 or eager"),
    ("codebase", True, "whose train() to run: auto (EAGLE from an EAGLE checkout, else LLaVA), llava or eagle"),
    ("off", False, "train without pruning (the plugin stays disabled): a baseline with the same entry"),
)
OPTIONS = tuple(ENABLE_OPTIONS) + TRAINING_OPTIONS


def pop_options(argv: List[str]) -> MeteorOptions:
    """Remove the METEOR flags from ``argv`` (in place) and return what they say."""
    parsed = pop_enable_options(argv, TRAINING_OPTIONS)
    opts = MeteorOptions(config=parsed.config, overrides=parsed.overrides)
    if "attn" in parsed.extra:
        if parsed.extra["attn"] not in ATTENTION:
            raise SystemExit(f"--meteor-attn takes one of {', '.join(ATTENTION)}, got {parsed.extra['attn']!r}")
        opts.attn = parsed.extra["attn"]
    opts.codebase = parsed.extra.get("codebase", opts.codebase)
    opts.off = bool(parsed.extra.get("off", False))
    return opts


def meteor_fields() -> List[Tuple[str, Any, Any]]:
    """(name, type, field) triples for ``dataclasses.make_dataclass``: the flags, for --help only."""
    out = []
    for name, takes_value, text in OPTIONS:
        kind = Optional[str] if takes_value else bool
        default = None if takes_value else False
        out.append((f"meteor_{name}", kind, field(default=default, metadata={
            "help": f"[METEOR, taken by meteor_plugin.train; also --meteor-{name}] {text}"})))
    return out


_MADE: "weakref.WeakSet[type]" = weakref.WeakSet()  # the argument classes made here: never wrapped twice


def with_meteor_fields(model_arguments: type) -> type:
    """Upstream's ``ModelArguments`` with METEOR's flags as fields (so ``--help`` lists them)."""
    if model_arguments in _MADE:
        return model_arguments
    cls = dataclasses.make_dataclass(model_arguments.__name__, meteor_fields(), bases=(model_arguments,))
    cls.__module__ = model_arguments.__module__
    _MADE.add(cls)
    return cls


def with_cpu_setup(training_arguments: type, after_parse: Sequence = ()) -> type:
    """Upstream's ``TrainingArguments`` that, right after parsing, applies the CPU flags this transformers
    generation needs and runs ``after_parse`` hooks (``fn(args)``), before ``train()`` builds the model."""
    from .deepspeed import cpu_training_flags, init_distributed_early, on_cpu

    if training_arguments in _MADE:
        return training_arguments

    def __post_init__(self):
        flags = cpu_training_flags()
        for key, value in flags.items():
            setattr(self, key, value)
        if on_cpu() and not flags and getattr(self, "deepspeed", None) and getattr(self, "use_cpu", False):
            # transformers 4.x: use_cpu turns DeepSpeed into DDP without a word; say so instead.
            raise SystemExit("--use_cpu True with --deepspeed on transformers 4.x trains with DDP, not DeepSpeed: "
                             "drop --use_cpu (meteor_plugin.train sets up DeepSpeed on CPU itself)")
        training_arguments.__post_init__(self)
        init_distributed_early(self)
        for hook in after_parse:
            hook(self)

    cls = dataclasses.make_dataclass(training_arguments.__name__, [], bases=(training_arguments,),
                                     namespace={"__post_init__": __post_init__})
    cls.__module__ = training_arguments.__module__
    _MADE.add(cls)
    return cls
