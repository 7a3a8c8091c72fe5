"""LLaVA (haotian-liu/LLaVA at c121f04, PyPI ``llava-torch`` 1.2.2): the classes to wrap."""

from .common import FamilyTarget
from .vision import patch_llava_clip

TARGET = FamilyTarget(
    name="llava",
    module="llava.model.language_model.llava_llama",
    causal="LlavaLlamaForCausalLM",
    llm="LlavaLlamaModel",
    vision=(patch_llava_clip,),
)
