"""One adapter module per model family: everything the plugin knows about it.

    llava.py     the llava package: LLaVA-1.5 and 1.6 (anyres), Vicuna and Mistral
    eagle.py     EAGLE: its multi-encoder tower (Stages 1 and 2), training, the patcher's edits
    hf_llava.py  transformers' LlavaForConditionalGeneration, LlavaNextForConditionalGeneration and
                 LlavaOnevisionForConditionalGeneration (hf_llava_v4.py: its path on transformers 4.x)
    qwen_vl/     transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL (a package: one module per part)

Each defines ``FAMILY`` (``family.Family``): what ``enable()`` patches, what training needs, what the
patcher inserts in a checkout. Shared by several: ``llava_arch.py`` (the wrappers for models built on
LLaVA's ``*_arch.py``), ``vision.py`` (vision-side records), ``anyres.py`` (LLaVA-1.6's spatial merges),
``refusal.py`` (the error for a vision-language model no family prunes).

To add a family: write its module with a ``FAMILY`` and add it to ``FAMILIES`` below. Inference
(``patching.py``), training (``training/codebases.py``) and the patcher (``patcher/codebases.py``) read
this list and nothing else.
"""

from . import eagle, hf_llava, llava, qwen_vl
from .family import Family

FAMILIES = (llava.FAMILY, eagle.FAMILY, hf_llava.FAMILY, qwen_vl.FAMILY)
BY_NAME = {f.name: f for f in FAMILIES}

__all__ = ["FAMILIES", "BY_NAME", "Family"]
