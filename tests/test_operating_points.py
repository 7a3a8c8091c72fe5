"""``meteor-plugin calibrate --questions``: Stage 3's operating points on a user's own questions, end to end."""

import json
import os

import pytest
import torch

import meteor_plugin
from meteor_plugin import operating_points as op
from meteor_plugin.cli import main
from meteor_plugin.core.budget import clipped_budgets, solve_scale


def _write_questions(folder, rows):
    """rows: (image name or None to leave it missing, question, answer); returns the .jsonl path."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, (name, _, _) in enumerate(rows):
        if name is not None:
            Image.new("RGB", (40, 32), (40 * i % 255, 90, 160)).save(os.path.join(folder, name))
    path = os.path.join(folder, "questions.jsonl")
    with open(path, "w") as fh:
        for i, (name, question, answer) in enumerate(rows):
            fh.write(json.dumps({"image": name or f"missing-{i}.png", "question": question, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint

    return save_tiny_llava_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


def test_the_scale_solved_averages_the_target_within_the_bounds():
    signals = [1.0, 2.0, 4.0, 8.0]
    low, high = [2.0] * 4, [20.0] * 4
    scale = solve_scale(signals, 9.0, low, high)
    budgets = clipped_budgets(torch.tensor(signals), scale, torch.tensor(low), torch.tensor(high))
    assert float(budgets.mean()) == pytest.approx(9.0, abs=0.5) and float(budgets.max()) <= 20
    with pytest.raises(ValueError, match="outside the per-question bounds"):
        solve_scale(signals, 30.0, low, high)
    with pytest.raises(ValueError, match="no budget signal"):
        solve_scale([0.0, 0.0], 3.0, [2.0, 2.0], [5.0, 5.0])


@pytest.mark.parametrize("reply,answer,right", [("Red.", "red", True), ("red square", "red", True),
                                                ("reddish", "red", False), ("B) a cat", "B", True),
                                                ("A", "B", False), (" 3 ", "3", True)])
def test_a_reply_is_right_when_it_gives_the_answer(reply, answer, right):
    assert op.is_right(reply, answer) is right


def test_the_command_sweeps_layers_and_budgets_and_writes_the_cheapest_config_that_keeps_the_answers(
        tiny_checkpoint, tmp_path, capsys):
    folder = str(tmp_path / "q")
    rows = [(f"{i}.png", f"w{10 + i} w{20 + i} ?", "x") for i in range(4)]
    path = _write_questions(folder, rows)
    # The answers are what the unpruned model replies, so the unpruned accuracy is 1 and each point's is read.
    from meteor_plugin import adapters
    from meteor_plugin.calibrate import load_checkpoint

    tokenizer, model = load_checkpoint(tiny_checkpoint)
    asker = op.Asker(model, tokenizer, adapters.family_of(model), op.load_questions(path), max_new_tokens=2,
                     progress=False)
    replies, _, _, _ = asker.answer(meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=False), "unpruned")
    rows = [(name, q, reply) for (name, q, _), reply in zip(rows, replies)]
    path = _write_questions(folder, rows)
    out = tmp_path / "chosen.json"
    assert main(["calibrate", "--model-path", tiny_checkpoint, "--questions", path, "--layers", "1,2",
                 "--budgets", "0.5,0.25", "--max-new-tokens", "2", "--flops-questions", "1", "--no-progress",
                 "--plot", str(tmp_path / "points.png"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith(("unpruned", "layer "))]
    assert lines[0].split()[1] == "1.000"  # the unpruned model gives its own answers
    assert [line.split(",")[0] for line in lines[1:]] == ["layer 1", "layer 1", "layer 2", "layer 2"]
    chosen = meteor_plugin.MeteorConfig.from_file(out)
    assert chosen.llm and chosen.llm_layer in (1, 2) and chosen.llm_lambda > 0
    assert "<- chosen" in printed and f"layer {chosen.llm_layer}" in printed.split("<- chosen")[0].splitlines()[-1]
    gflops = [float(line.replace("<- chosen", "").split()[-3]) for line in lines]
    assert all(g < gflops[0] for g in gflops[1:])  # every pruned point costs less than the unpruned model
    assert (tmp_path / "points.png").stat().st_size > 0
    assert not meteor_plugin.is_enabled()  # scopes only: the user's switch is as it was


@pytest.mark.parametrize("case,message", [
    ("missing image", r"questions.jsonl:2: image .*missing-1.png not found"),
    ("empty file", "no questions in it"),
    ("no answer", r"questions.jsonl:1: no answer"),
    ("no tokenizer", "has no tokenizer"),
])
def test_bad_input_is_refused_in_one_line_by_name_and_nothing_is_written(tiny_checkpoint, tmp_path, capsys, case,
                                                                         message):
    import re
    import shutil

    folder = str(tmp_path / "q")
    checkpoint = tiny_checkpoint
    if case == "missing image":
        path = _write_questions(folder, [("0.png", "w1 ?", "a"), (None, "w2 ?", "b")])
    elif case == "empty file":
        os.makedirs(folder)
        path = os.path.join(folder, "questions.jsonl")
        open(path, "w").close()
    elif case == "no answer":
        path = _write_questions(folder, [("0.png", "w1 ?", "")])
    else:
        path = _write_questions(folder, [("0.png", "w1 ?", "a")])
        checkpoint = str(tmp_path / "tiny-llava-no-tokenizer")
        shutil.copytree(tiny_checkpoint, checkpoint)
        for name in os.listdir(checkpoint):
            if name.startswith(("tokenizer", "special_tokens")):
                os.remove(os.path.join(checkpoint, name))
    out = tmp_path / "chosen.json"
    assert main(["calibrate", "--model-path", checkpoint, "--questions", path, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and re.search(message, err), err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_on_the_fidelity_model_with_its_validation_questions(tmp_path, capsys):
    """The shipped fidelity model, asked its own validation questions in LLaVA's format through the command."""
    from meteor_plugin.cli import _calibrate  # noqa: F401 (the command's loader opens the fidelity checkpoint)
    from meteor_plugin.fidelity import checkpoint_path
    from meteor_plugin.fidelity.llava_format import export_questions

    path = export_questions(str(tmp_path / "val"), per_kind=3)
    out = tmp_path / "fidelity.json"
    assert main(["calibrate", "--model-path", checkpoint_path(), "--questions", path, "--conv-mode", "v1",
                 "--layers", "7", "--budgets", "0.5", "--max-new-tokens", "2", "--flops-questions", "1",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    unpruned = next(line for line in printed.splitlines() if line.startswith("unpruned"))
    assert float(unpruned.split()[1]) >= 0.9  # the model knows its task through LLaVA's question format
    chosen = meteor_plugin.MeteorConfig.from_file(out)
    assert chosen.llm_layer == 7 and chosen.llm_lambda > 0 and "12 questions" in printed
