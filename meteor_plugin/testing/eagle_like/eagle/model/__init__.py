from .language_model.eagle_llama import EagleConfig, EagleLlamaForCausalLM  # noqa: F401
