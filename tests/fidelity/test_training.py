"""Training the fidelity model: both phases lower their loss on a tiny version of the task, through the
same code as the real run (``recipe``: our pretraining loop, then ``python -m meteor_plugin.train`` driving
the EAGLE stand-in's ``train.py``), and multi-turn v1 data is masked right with the task's tokenizer."""

import dataclasses
import json
import os

import pytest

from meteor_plugin.fidelity import llava_format, make_sample, recipe
from meteor_plugin.fidelity.questions import Question


def test_tiny_training_run_lowers_both_losses(tmp_path):
    settings = recipe.RecipeSettings(workdir=str(tmp_path), pretrain_steps=16, pretrain_batch=8, pretrain_lr=3e-3,
                                     pretrain_log_every=1, finetune_steps=12, batch_size=4, lr=3e-3, threads=1,
                                     per_kind=2, logging_steps=1)
    logged = []
    model = recipe.pretrain(settings, echo=logged.append)
    losses = [r["loss"] for r in logged]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses

    data = recipe.write_data(settings, 96, echo=lambda *a: None)
    out = recipe.finetune(settings, model, data, echo=lambda *a: None)
    log = open(os.path.join(str(tmp_path), "finetune.log"), encoding="utf-8").read()
    steps = recipe.logged_losses(log)
    assert len(steps) == 12, log[-2000:]
    assert sum(steps[-3:]) / 3 < 0.7 * sum(steps[:3]) / 3, steps
    assert "tokenization mismatch" not in log  # every multi-turn sample kept its labels
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_multi_turn_v1_labels_only_the_assistant_side(monkeypatch):
    """The entry's preprocess_v1 wrapper: the task's tokenizer has no ``legacy`` flag; with it set, every
    round is masked up to its ``ASSISTANT:`` and the answer and ``</s>`` are learned."""
    from meteor_plugin.compat import training as compat
    from meteor_plugin.training import hooks

    compat.make_trainer_importable()
    import llava.train.train as llava_train
    from llava import conversation

    monkeypatch.setattr(conversation, "default_conversation", conversation.conv_templates["v1"])
    tokenizer = llava_format.build_hf_tokenizer()
    assert not hasattr(tokenizer, "legacy")
    turns = make_sample("train", 7, per_kind=2).turns
    assert len(turns) >= 3
    record = llava_format.conversation_record("7", "7.png", turns)
    with pytest.raises(AttributeError, match="legacy"):
        llava_train.preprocess_v1([record["conversations"]], tokenizer, has_image=True)
    hooks.default_tokenizer_legacy(llava_train)  # training's registry: the autouse fixture's hooks.uninstall() undoes it
    out = llava_train.preprocess_v1([record["conversations"]], tokenizer, has_image=True)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    learned = [tokenizer.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != -100]
    expected = []
    for q in turns:
        expected += ["ASSISTANT:", q.answer, "</s>"]
    assert learned == expected
    assert ids.count(-200) == 1 and labels[ids.index(-200)] == -100


def test_hf_tokenizer_round_trip_and_prompt(tmp_path):
    llava_format.save_hf_tokenizer(str(tmp_path))
    tokenizer = llava_format.load_hf_tokenizer(str(tmp_path))
    assert len(tokenizer) == llava_format.vocab_size()
    ids = llava_format.prompt_ids(tokenizer, "what digit is in the image ?")
    system = llava_format.SYSTEM.split()  # <s>, the system prompt word by word (the sink real models have)
    assert ids[0] == 1 and tokenizer.convert_ids_to_tokens(ids[1:1 + len(system)]) == system
    assert tokenizer.convert_ids_to_tokens(ids[1 + len(system)]) == "USER:" and ids[2 + len(system)] == -200
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "ASSISTANT:"
    assert tokenizer.unk_token_id not in ids
    q = Question("digit", None, "what digit is in the image ?", "7")
    record = llava_format.conversation_record("x", "x.png", [q, q])
    assert record["conversations"][0]["value"].startswith("<image>\n")
    assert "<image>" not in record["conversations"][2]["value"]


def test_further_rounds_chain_from_the_last_model_on_fresh_images(tmp_path, monkeypatch):
    """Phase 5 (``keep_training``): each round fine-tunes the previous round's output on images of its own
    seed, at the full lr; rounds that would reuse a phase's images are refused; a run from a trained
    checkpoint records that checkpoint's own record as its base."""
    calls = []

    def fake_finetune(phase, model, data, echo, name):
        calls.append((name, model, phase.seed, phase.finetune_steps, phase.lr, data["data_path"]))
        return os.path.join(str(tmp_path), "out-" + name)

    monkeypatch.setattr(recipe, "finetune", fake_finetune)
    settings = recipe.RecipeSettings(workdir=str(tmp_path), batch_size=2, seed=0, continue_steps=(3, 2),
                                     continue_seeds=(2, 4))
    recipe.check_rounds(settings)
    out = recipe.keep_training(settings, "first", echo=lambda *a: None)
    assert out == os.path.join(str(tmp_path), "out-continue2")
    assert [c[:5] for c in calls] == [("continue1", "first", 2, 3, settings.lr),
                                      ("continue2", os.path.join(str(tmp_path), "out-continue1"), 4, 2, settings.lr)]
    first = json.load(open(calls[0][5], encoding="utf-8"))
    second = json.load(open(calls[1][5], encoding="utf-8"))
    assert len(first) == 6 and len(second) == 4  # steps x batch conversations, each round its own images
    assert first[0]["image"] == second[0]["image"] and first[0]["conversations"] != second[0]["conversations"]
    # Phase 3 (``refine``) is the same kind of round at its own lr and seed, from the model it is given.
    refined = recipe.refine(dataclasses.replace(settings, refine_steps=2, refine_seed=7, refine_lr=1e-4), "first",
                            echo=lambda *a: None)
    assert refined == os.path.join(str(tmp_path), "out-refine")
    assert calls[-1][:5] == ("refine", "first", 7, 2, 1e-4)
    assert calls[-1][5] == os.path.join(str(tmp_path), "data-refine", "data.json")
    assert len(json.load(open(calls[-1][5], encoding="utf-8"))) == 4
    for steps, seeds in (((3,), ()), ((3, 2), (2, 2)), ((3,), (0,)), ((0,), (2,))):
        with pytest.raises(ValueError, match="continue_"):
            recipe.check_rounds(recipe.RecipeSettings(workdir="", continue_steps=steps, continue_seeds=seeds))

    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / recipe.RECORD).write_text(json.dumps({"fixed_test": {"accuracy": {"count": 0.5}}}))
    assert recipe.base_record(str(trained))["fixed_test"]["accuracy"]["count"] == 0.5
    assert recipe.base_record(str(tmp_path)) is None and recipe.base_record(None) is None
