"""METEOR under transformers' tensor parallelism (``from_pretrained(..., distributed_config=DistributedConfig(
tp_plan="auto"))`` under torchrun), on 2 CPU processes with gloo: every family and stage against the same saved model
pruned in one process. One launch runs every case (tensor_parallel_run.py); the test process computes the
references. Stacks whose transformers has no tensor-parallel loading (4.37, 4.44) skip, saying so."""

import os
import subprocess
import sys

import pytest
import torch

from meteor_plugin.compat.tensor_parallel import unavailable
from tests.stages import tensor_parallel_run as cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
FAMILIES = sorted({case.family for case in cases.CASES.values()})
RUN = [name for name in cases.CASES if name not in cases.REFUSED]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(one-process references, per-rank results) of every case: the models saved once, then one torchrun
    launch of two ranks, and the references computed here meanwhile."""
    root = str(tmp_path_factory.mktemp("meteor-tp"))
    for family in FAMILIES:
        cases.save_family(family, cases.folder_of(root, family))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    script = os.path.join(REPO, "tests", "stages", "tensor_parallel_run.py")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, root], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    references = {name: cases.run_case(name, root, distributed=False) for name in RUN}
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return references, ranks, log


def _result(ranks, name, rank):
    out = ranks[rank][name]
    assert "error" not in out, f"rank {rank}, case {name}: {out.get('error')}"
    return out


@pytest.mark.parametrize("name", RUN)
def test_every_rank_generates_the_one_process_tokens_and_logits(launched, name):
    references, ranks, _ = launched
    reference = references[name]
    for rank in range(2):
        out = _result(ranks, name, rank)
        assert torch.equal(out["tokens"], reference["tokens"]), (rank, out["tokens"], reference["tokens"])
        torch.testing.assert_close(out["logits"], reference["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", RUN)
def test_the_ranks_keep_the_same_tokens_per_layer_as_one_process(launched, name):
    references, ranks, _ = launched
    for kind in ("generate_stats", "forward_stats"):
        first, second = _result(ranks, name, 0)[kind], _result(ranks, name, 1)[kind]
        assert first == second  # the ranks agree exactly: counts, kept positions, heads, signals
        reference = references[name][kind]
        assert first["layer_seq_len"] == reference["layer_seq_len"]
        assert first["layer_tokens"] == reference["layer_tokens"]
        for mine, theirs in zip(first["samples"], reference["samples"]):
            assert mine.keys() == theirs.keys()
            for stage in mine:
                assert (mine[stage]["in"], mine[stage]["out"]) == (theirs[stage]["in"], theirs[stage]["out"]), stage
                for key in ("kept", "heads"):
                    assert mine[stage].get(key) == theirs[stage].get(key), (stage, key)
    # Stage 3 pruned: the layers from llm_layer on ran on fewer tokens than those before it
    lengths = references[name]["generate_stats"]["layer_seq_len"]
    assert lengths[-1] < lengths[0], lengths


def test_the_top_heads_are_chosen_among_every_rank_s_heads(launched):
    """2 of 4 heads are used, 2 heads on each rank: the ranks choose the one-process heads, one from each rank's
    slice where those are the top ones (a rank scoring from its own heads alone could not)."""
    references, ranks, _ = launched
    chosen = []
    for name in RUN:
        for mine, theirs in zip(_result(ranks, name, 0)["generate_stats"]["samples"],
                                references[name]["generate_stats"]["samples"]):
            if len(theirs.get("llm", {}).get("heads", [])) == 2:
                assert mine["llm"]["heads"] == theirs["llm"]["heads"], name
                chosen.append(tuple(mine["llm"]["heads"]))
    assert any(first < 2 <= second for first, second in chosen), chosen


@pytest.mark.parametrize("name", sorted(cases.REFUSED))
def test_what_stage3_cannot_run_under_is_refused_by_name_on_every_rank(launched, name):
    """A plan with sequence parallelism; ranks given different configs (their activations would mix silently)."""
    _, ranks, _ = launched
    for rank in range(2):
        error = ranks[rank][name].get("error", "")
        assert error.startswith(cases.REFUSED[name]), error


def test_pipeline_parallelism_is_refused_by_name():
    """What pp_size=2 leaves on a rank: the other rank's decoder layers replaced by transformers' identities."""
    import meteor_plugin
    from meteor_plugin.testing.llava import build_tiny_hf_llava, hf_batch
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    model = build_tiny_hf_llava()
    model.model.language_model.layers[3] = PipelineIdentityLayer()
    ids, mask, pixels = hf_batch([(4, 6)], seed=1)
    meteor_plugin.enable(encoder=False, llm=True)
    with pytest.raises(NotImplementedError, match=r"decoder layers \[3\] run on other ranks \(pipeline parallelism"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
