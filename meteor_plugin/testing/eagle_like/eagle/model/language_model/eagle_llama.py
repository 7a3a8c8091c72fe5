"""EAGLE's Llama wrappers: ``EagleConfig``, ``EagleLlamaModel``, ``EagleLlamaForCausalLM``.

Reproduces the interfaces of EAGLE's ``eagle_llama.py`` (a rename-copy of LLaVA's ``llava_llama.py``):
``EagleLlamaModel`` has no forward of its own (it is ``LlamaModel.forward``); the causal model's
``forward`` splices images when no embeddings are given and swallows extra kwargs such as
``cache_position`` without passing them on (so LlamaModel recomputes it from the cache); ``generate``
is embeds-only (the returned ids hold no prompt; 4.37 prepends one BOS per row); and
``prepare_inputs_for_generation`` carries ``images`` / ``image_sizes`` to every step.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..eagle_arch import EagleMetaForCausalLM, EagleMetaModel


class EagleConfig(LlamaConfig):
    model_type = "eagle_llama"


class EagleLlamaModel(EagleMetaModel, LlamaModel):
    config_class = EagleConfig

    def __init__(self, config: LlamaConfig):
        super(EagleLlamaModel, self).__init__(config)


class EagleLlamaForCausalLM(LlamaForCausalLM, EagleMetaForCausalLM):
    config_class = EagleConfig

    def __init__(self, config):
        # Skip LlamaForCausalLM.__init__ (it would build a plain LlamaModel) and build EAGLE's instead.
        super(LlamaForCausalLM, self).__init__(config)
        self.model = EagleLlamaModel(config)
        self.pretraining_tp = getattr(config, "pretraining_tp", 1)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        images: Optional[torch.FloatTensor] = None,
        image_sizes: Optional[List[List[int]]] = None,
        return_dict: Optional[bool] = None,
        **kwargs,  # EAGLE's addition: newer generate passes cache_position; it is dropped here
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                )
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")
        if images is not None:
            (inputs, position_ids, attention_mask, _, inputs_embeds, _) = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes=image_sizes
            )
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)
        # Embeddings only: the prompt ids are not part of what generate returns.
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        image_sizes = kwargs.pop("image_sizes", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        if images is not None:
            inputs["images"] = images
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs


AutoConfig.register("eagle_llama", EagleConfig)
AutoModelForCausalLM.register(EagleConfig, EagleLlamaForCausalLM)
