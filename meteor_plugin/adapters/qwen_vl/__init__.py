"""transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``): the family's record.

    target.py     which classes are patched, from which transformers on (5.x; none exist on the 4.x stacks)
    inference.py  the wrappers: a pruning call encodes the images, fits the prompt and hands Stage 3 its layout
    vision.py     Stage 1 inside the packed Qwen towers (Qwen2.5-VL's windows, Qwen3-VL's DeepStack), baselines
    positions.py  multimodal RoPE positions of a pruned prompt: every kept token at its unpruned (t, h, w)

What each stage does on them:
- **Stage 1** drops merged tokens (each ``merge x merge`` square of patches the language model sees as one token)
  inside the tower at the boundaries of three equal-depth segments, per image;
- **Stage 3** runs in the Qwen language model as on every Llama-style decoder (``stages/decoder.py``): the last
  instruction token's attention at ``llm_layer`` from that layer's own q/k (and Qwen3's q/k norms) with the
  merged multimodal rotary table the layers receive, the adaptive budget, later layers and their KV cache on
  the kept tokens; Qwen3-VL's DeepStack features follow the kept tokens;
- **positions**: kept tokens keep their unpruned (t, h, w) positions; with proportional attention, their sizes;
- the pre-LLM baselines (random, avgpool, visionzip) on the merged tokens, ``fastv`` as Stage 3; drop_encoder is
  refused (one tower); videos are pruned by Stage 3 and refused by Stage 1 and the baselines.
Training is not wired (a loss forward with pruning is refused) and there is no checkout to patch.
"""

from ..family import Family
from .target import CLASSES, TARGET

FAMILY = Family(name=TARGET.name, target=TARGET)

__all__ = ["CLASSES", "FAMILY", "TARGET"]
