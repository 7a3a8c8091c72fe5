"""The calls lmms-eval 0.7.3 makes to load a model and answer with it, for its ``llava`` and ``llava_hf`` models.

    python -m meteor_plugin.run [--meteor-config PATH] tests.lmms_eval_harness MODEL CHECKPOINT OUT_JSON

Not a test (pytest does not collect it). lmms-eval does not install on the CPU stack (it requires
torchvision and timm), so this module makes the loader and ``generate`` calls its model classes make
(``lmms_eval/models/simple/llava.py`` and ``llava_hf.py``), with the CPU in place of CUDA, and writes each
answer's token ids and ``meteor_plugin.stats`` to OUT_JSON. It never imports or enables meteor_plugin
itself: that is the runner's job, as it is when lmms-eval runs under it.
"""

import json
import sys

import torch

QUESTIONS = 2
NEW_TOKENS = 4


def _image(seed, size):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def llava(checkpoint):
    """lmms-eval's ``llava`` model: the llava package's loader, a vicuna_v1 prompt, batch size 1 (its default)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import get_model_name_from_path, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    args = {"multimodal": True, "attn_implementation": "sdpa"}
    name = get_model_name_from_path(checkpoint)
    try:  # lmms-eval's own fallback: the original llava package has no `multimodal` argument
        tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, name, device_map="cpu", device="cpu",
                                                               **args)
    except TypeError:
        args.pop("multimodal", None)
        tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, name, device_map="cpu", device="cpu",
                                                               **args)
    # The loader gives float16 for a GPU; and transformers 4.x leaves torch's default dtype at float16 after
    # the failed first attempt (its from_pretrained restores it only on success).
    torch.set_default_dtype(torch.float32)
    model = model.float().eval()
    size = model.get_model().get_vision_tower().config.image_size
    answers, stats = [], []
    for q in range(QUESTIONS):
        prompt = "USER: <image>\n" + " ".join(f"w{10 + 3 * q + i}" for i in range(2 + q)) + " ASSISTANT:"
        ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(ids, attention_mask=ids.ne(pad), pad_token_id=pad, images=_image(q, size),
                                 image_sizes=[(size, size)], do_sample=False, temperature=0, top_p=None, num_beams=1,
                                 max_new_tokens=NEW_TOKENS, use_cache=True)
        answers.append(out[0].tolist())
        stats.append(_stats(model))
    return answers, stats


def llava_hf(checkpoint):
    """lmms-eval's ``llava_hf`` model: the class chosen by model_type, left padding, the prompt sliced off."""
    import transformers
    from transformers import AutoConfig

    classes = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
    config = AutoConfig.from_pretrained(checkpoint)
    cls = getattr(transformers, classes[config.model_type])
    model = cls.from_pretrained(checkpoint, revision="main", torch_dtype="auto", device_map="cpu", trust_remote_code=False,
                                attn_implementation=None).eval()
    with open(f"{checkpoint}/prompts.json", encoding="utf-8") as fh:
        prompts = json.load(fh)  # what the processor would write: one image token per visual token
    size = config.vision_config.image_size
    eot = model.generation_config.pad_token_id
    answers, stats = [], []
    for q, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _image(q, size)}
        with torch.no_grad():
            cont = model.generate(**inputs, do_sample=False, temperature=None, top_p=None, num_beams=1,
                                  max_new_tokens=NEW_TOKENS, use_cache=True, pad_token_id=eot, eos_token_id=eot)
        answers.append({"full": cont[0].tolist(), "answer": cont[:, ids.shape[-1]:][0].tolist()})
        stats.append(_stats(model))
    return answers, stats


def _stats(model):
    import meteor_plugin

    run = meteor_plugin.stats(model) if "meteor_plugin" in sys.modules else None
    return run.to_dict() if run is not None else None


def main():
    kind, checkpoint, out = sys.argv[1:4]
    answers, stats = {"llava": llava, "llava_hf": llava_hf}[kind](checkpoint)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"answers": answers, "stats": stats}, fh)


if __name__ == "__main__":
    main()
