"""In training, Stage 3 chooses visual tokens from the instruction only: the answer (the tokens with labels)
never takes part. Batches come from LLaVA's own dataset and collator (train.py's preprocess_v1)."""

import json
import os

import pytest
import torch

import meteor_plugin
from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint, vision_tower_path
from meteor_plugin.testing import workspace as tiny
from meteor_plugin.compat.training import make_trainer_importable

QUESTION = "<image>\nwhat is the colour of the square in this image ?"
OTHER_QUESTIONS = ("<image>\ndescribe the shape in this image .", "<image>\nwhat is in the image ?",
                   "<image>\nis there a circle in the left of this image ?")


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pruning-data"))
    checkpoint = save_tiny_llava_checkpoint(os.path.join(root, "models"))
    tiny.write_images_and_data(os.path.join(root, "data"), samples=1)
    return checkpoint, os.path.join(root, "data")


def _batch(llava_data, monkeypatch, conversations):
    make_trainer_importable()
    from transformers import AutoTokenizer, CLIPImageProcessor

    import llava.train.train as train
    from llava import conversation as conversation_lib

    checkpoint, data = llava_data
    records = [{"id": str(i), "image": "0000.png",
                "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(conversations)]
    path = os.path.join(data, f"probe-{abs(hash(json.dumps(records)))}.json")
    with open(path, "w") as fh:
        json.dump(records, fh)
    monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates["v1"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=False, model_max_length=256, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    args = train.DataArguments(data_path=path, image_folder=os.path.join(data, "images"), is_multimodal=True,
                               image_aspect_ratio="pad")
    args.image_processor = CLIPImageProcessor.from_pretrained(vision_tower_path(checkpoint))
    args.mm_use_im_start_end = False
    dataset = train.LazySupervisedDataset(path, tokenizer, args)
    return train.DataCollatorForSupervisedDataset(tokenizer)([dataset[i] for i in range(len(records))])


def _kept(model, batch):
    out = model(**batch)
    assert torch.isfinite(out.loss)
    return [s["llm"].detail["kept"] for s in meteor_plugin.stats(model).stages]


def test_labels_mark_the_answer_and_changing_it_never_changes_the_chosen_tokens(llava_data, monkeypatch):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(llava_data[0])
    model.get_vision_tower().load_model()
    model.train()
    meteor_plugin.enable(llm_max_keep=0.25, encoder=False)

    answers = ("a red square in the top left .", "no . two blue circle there in the bottom right yes one .")
    batch = _batch(llava_data, monkeypatch, [(QUESTION, a) for a in answers])
    # LLaVA's preprocessing labelled exactly the answers (a tokenization mismatch would label nothing).
    labelled = (batch["labels"] != -100).sum(dim=1).tolist()
    assert labelled == [len(a.split()) + 2 for a in answers]  # + "ASSISTANT:" (the word tokenizer's split) + </s>
    together = _kept(model, batch)
    alone = [_kept(model, _batch(llava_data, monkeypatch, [(QUESTION, a)]))[0] for a in answers]
    assert together[0] == together[1] == alone[0] == alone[1]

    # The test can fail: another instruction does choose other tokens.
    others = [_kept(model, _batch(llava_data, monkeypatch, [(q, answers[0])]))[0] for q in OTHER_QUESTIONS]
    assert any(kept != together[0] for kept in others)
