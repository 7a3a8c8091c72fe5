"""``meteor-plugin bench llava --tp 2`` on a CPU (gloo): it relaunches itself on two ranks and reports what it
measured consistently (no timing is asserted here)."""

import json

import pytest

from meteor_plugin.cli import main
from meteor_plugin.compat.tensor_parallel import unavailable


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_tensor_parallel_bench_reports_the_same_tokens_on_every_rank_and_fewer_per_layer(capfd):
    assert main(["bench", "llava", "--tp", "2", "--quick", "--repeats", "1", "--json"]) == 0
    result = json.loads(capfd.readouterr().out)  # rank 0's report (the ranks run in child processes)
    assert result["backend"] == "gloo" and result["settings"]["ranks"] == 2
    unpruned, pruned = result["variants"]["unpruned"], result["variants"]["stage3"]
    assert (unpruned["visual_tokens"], pruned["visual_tokens"]) == (144, 36)
    assert unpruned["layer_tokens"] == [154] * 4 and pruned["layer_tokens"] == [154, 154, 46, 46]
    assert unpruned["ranks_agree"] and pruned["ranks_agree"]
    assert result["flops_ratio"] > 1 and all(len(v["runs"]) == 1 and v["seconds"] > 0 for v in (unpruned, pruned))


def test_tp_is_refused_for_other_benches(capsys):
    assert main(["bench", "eagle", "--tp", "2", "--quick"]) == 2
    assert "--tp N (N >= 2) runs the llava bench" in capsys.readouterr().err
