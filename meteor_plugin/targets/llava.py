"""LLaVA (haotian-liu/LLaVA at c121f04, PyPI ``llava-torch`` 1.2.2): the classes to wrap."""

from .common import FamilyTarget
from .vision import patch_llava_clip

TARGET = FamilyTarget(
    name="llava",
    module="llava.model.language_model.llava_llama",
    causal="LlavaLlamaForCausalLM",
    llm="LlavaLlamaModel",
    vision=(patch_llava_clip,),
    # llava-v1.6-mistral: the same llava_arch on MistralModel, whose decoder layers are Llama's
    variants=(("llava.model.language_model.llava_mistral", "LlavaMistralForCausalLM", "LlavaMistralModel"),),
    refused={"LlavaMptForCausalLM": "its upstream forward does not run in llava-torch 1.2.2 (MPT's "
                                    "transformers port changed under it), and MPT's blocks are not Llama's"},
)
