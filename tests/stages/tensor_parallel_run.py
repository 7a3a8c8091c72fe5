"""The cases of test_tensor_parallel.py: run under torchrun (2 CPU processes, gloo) on models loaded tensor-parallel,
and imported by the test for the one-process reference on the same saved models.

Each case loads a saved tiny model (with transformers' tensor-parallel plan when launched by torchrun, whole
otherwise), prunes it with its config, and gives back the greedy tokens of a cached ``generate``, the last position's
logits of a forward, and the stats of both. Launched as

    torchrun --standalone --nproc_per_node 2 tests/stages/tensor_parallel_run.py ROOT

it writes ``ROOT/rank{N}.pt``: per case its result, or ``{"error": "Type: message"}``.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Optional

import torch

STEPS = 3
HEADS = dict(llm_top_heads=2, llm_min_heads=1)  # 2 of the tiny models' 4 heads: which ones matters across ranks


@dataclass(frozen=True)
class Case:
    family: str
    config: Dict[str, Any]
    plan: Any = None  # an override of the model's tensor-parallel plan (None: "auto")
    rank1: Optional[Dict[str, Any]] = None  # config fields rank 1 runs with instead (a broken launch)


CASES = {
    "llava": Case("llava", dict(encoder=True, llm=True, **HEADS)),
    "llava-fastv": Case("llava", dict(method="fastv", encoder=False, llm=True, llm_max_keep=16)),
    "next": Case("next", dict(encoder=True, llm=True, proportional_attention="off", **HEADS)),
    "onevision": Case("onevision", dict(encoder=False, llm=True, proportional_attention="on", **HEADS)),
    "onevision-stage1": Case("onevision", dict(encoder=True, llm=True, proportional_attention="off", **HEADS)),
    "llava-package-random": Case("llava-package", dict(method="random", fusion_keep=16, llm=True, **HEADS)),
    "eagle": Case("eagle", dict(fusion_keep=0.25, **HEADS)),
    "sequence-parallel": Case("llava", dict(encoder=False, llm=True),
                              plan={"model.language_model.layers.*.input_layernorm": "sequence_parallel"}),
    "ranks-disagree": Case("llava", dict(encoder=False, llm=True), rank1=dict(llm_max_keep=0.25)),
    "sharded-tower": Case("llava", dict(encoder=True, llm=False),
                          plan={"model.vision_tower.encoder.layers.*.self_attn.q_proj": "colwise"}),
}
# Cases that fail on every rank, with the error they must raise.
REFUSED = {"sequence-parallel": "NotImplementedError: meteor-plugin Stage 3 cannot run on this tensor-parallel "
                                "LlamaModel: layers.*.input_layernorm runs under sequence parallelism",
           "ranks-disagree": "RuntimeError: meteor-plugin: the ranks of a tensor-parallel group were given different "
                             "inputs, visual layouts or configs",
           "sharded-tower": "NotImplementedError: meteor-plugin Stage 1: self_attn.q_proj of encoder block 0 is "
                            "tensor-parallel (ColwiseParallel)"}
HF_CLASSES = {"llava": "LlavaForConditionalGeneration", "next": "LlavaNextForConditionalGeneration",
              "onevision": "LlavaOnevisionForConditionalGeneration"}


# Building (the test's process) -----------------------------------------------------------------------------------
def save_family(family: str, folder: str) -> None:
    """Save ``family``'s tiny model and its inputs (a left-padded batch of two for transformers' classes, one
    prompt for the llava package's and EAGLE's) to ``folder``."""
    from meteor_plugin.testing import llava as tiny

    if family in HF_CLASSES:
        if family == "onevision":
            model = tiny.build_tiny_hf_onevision(max_crops=4)  # its anyres_max step keeps these grids: Stage 1 runs
        else:
            model = tiny.build_tiny_hf_llava(tiny.TinyLlavaSpec(merge="flat" if family == "llava" else "spatial_unpad"))
        if family == "llava":
            ids, mask, pixels = tiny.hf_batch([(4, 6), (3, 9)], seed=1)
            inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        else:
            ids, mask, pixels, sizes = tiny.hf_next_batch(model, [(4, 6), (3, 9)], [(32, 64), (64, 32)], seed=1)
            inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
        model.save_pretrained(folder)
    elif family == "llava-package":
        from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint

        save_tiny_llava_checkpoint(os.path.dirname(folder), name=os.path.basename(folder))
        ids, mask, images = tiny.make_batch([(4, 6)], [True], seed=1)
        inputs = dict(input_ids=ids, attention_mask=mask, images=images)
    else:
        from meteor_plugin.testing.eagle_like import save_tiny_eagle

        save_tiny_eagle(folder, tokenizer=False)
        ids, mask, images = tiny.make_batch([(3, 5)], [True], image_size=128, seed=0)
        inputs = dict(input_ids=ids, attention_mask=mask, images=images)
    torch.save(inputs, os.path.join(folder, "inputs.pt"))


def folder_of(root: str, family: str) -> str:
    return os.path.join(root, f"tiny-{family}")  # "llava" in the llava package's name: its loader reads it


# Loading and running (both) --------------------------------------------------------------------------------------
def load(family: str, folder: str, plan: Any = None) -> Any:
    """The saved model, tensor-parallel with ``plan`` ("auto" or an override of the model's plan) when given."""
    kwargs: Dict[str, Any] = {"dtype": torch.float32}
    if plan is not None:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan=plan)
    if family in HF_CLASSES:
        import transformers

        model = getattr(transformers, HF_CLASSES[family]).from_pretrained(folder, **kwargs)
        model.padding_side = "right"  # as the tiny builders set it (not saved)
    elif family == "llava-package":
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

        model = LlavaLlamaForCausalLM.from_pretrained(folder, **kwargs)
        model.get_vision_tower().load_model()
    else:
        from meteor_plugin.testing.eagle_like import install

        install()
        from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

        model = EagleLlamaForCausalLM.from_pretrained(folder, **kwargs)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.eval()


def run_case(name: str, root: str, distributed: bool) -> Dict[str, Any]:
    """One case: greedy tokens of a cached generate and its stats, last-position logits of a forward and its stats."""
    import meteor_plugin

    case = CASES[name]
    family, config = case.family, dict(case.config)
    if distributed and case.rank1 is not None and torch.distributed.get_rank() == 1:
        config.update(case.rank1)
    folder = folder_of(root, family)
    model = load(family, folder, (case.plan or "auto") if distributed else None)
    inputs = torch.load(os.path.join(folder, "inputs.pt"))
    meteor_plugin.enable(**config)
    try:
        with torch.no_grad():
            prompt = dict(inputs)
            ids = () if family in HF_CLASSES else (prompt.pop("input_ids"),)  # the llava package's: positional
            tokens = model.generate(*ids, **prompt, max_new_tokens=STEPS, do_sample=False, num_beams=1)[:, -STEPS:]
            generate_stats = meteor_plugin.stats(model).to_dict()
            logits = model(**inputs).logits[:, -1].float()
        forward_stats = meteor_plugin.stats(model).to_dict()
    finally:
        meteor_plugin.disable()
    return dict(tokens=tokens, logits=logits, generate_stats=generate_stats, forward_stats=forward_stats,
                heads=model.config.get_text_config().num_attention_heads)


def main(root: str) -> None:
    import warnings

    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a rank left waiting fails, not hangs
    results: Dict[str, Any] = {}
    for name in CASES:
        try:
            results[name] = run_case(name, root, distributed=True)
        except Exception as exc:  # recorded for the test, which says which case failed and why
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if name not in REFUSED:
                traceback.print_exc()
    torch.save(results, os.path.join(root, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
