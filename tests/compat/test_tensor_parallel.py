"""What compat/tensor_parallel.py reads off a module: the style transformers' tensor-parallel plan installed on it
(from the forward its ``install_forward`` sets), and which styles Stage 3 refuses. Real transformers styles,
installed without a process group (installing needs none; running would)."""

import pytest
import torch

from meteor_plugin.compat import tensor_parallel as compat_tp

styles = pytest.importorskip("transformers.distributed.tensor_parallel",
                             reason="transformers 4.37 and 4.44 have no tensor-parallel plans")


def installed(name, module=None):
    module = module if module is not None else torch.nn.Linear(8, 8)
    style = styles.ALL_PARALLEL_STYLES[name]
    # the base class's install_forward: what every style but ReplicatedWithGradAllReduce does, minus the
    # parameter conversion SequenceParallel adds (which needs a device mesh)
    installer = type(style).install_forward if name == "replicated_with_grad_allreduce" else \
        styles.TensorParallelLayer.install_forward
    installer(style, module, None)
    module._is_hooked = True
    return module


@pytest.mark.parametrize("name, cls", [("colwise", "ColwiseParallel"), ("rowwise", "RowwiseParallel"),
                                       ("colwise_gather_output", "ColwiseParallel"),
                                       ("embedding_rowwise", "EmbeddingParallel"),
                                       ("replicated_with_grad_allreduce", "ReplicatedWithGradAllReduce"),
                                       ("sequence_parallel", "SequenceParallel")])
def test_the_installed_style_is_read_off_the_module(name, cls):
    assert compat_tp.installed_style(installed(name)) == cls
    assert compat_tp.installed_style(torch.nn.Linear(8, 8)) is None  # nothing installed


def test_stage3_runs_under_the_models_own_styles_and_refuses_the_others_by_name():
    ok = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise_gather_output",
          "layers.*.self_attn.o_proj": "rowwise", "layers.*.mlp.down_proj": "rowwise", "embed_tokens":
          "embedding_rowwise", "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce"}
    for name, style in ok.items():
        module = installed(style)
        assert compat_tp.refusal(name, module, compat_tp.installed_style(module)) is None, name
    norm = installed("sequence_parallel", torch.nn.LayerNorm(8))
    assert "sequence parallelism" in compat_tp.refusal("layers.*.input_layernorm", norm, "SequenceParallel")
    q = installed("rowwise")  # q_proj's output would be summed across the ranks, not whole heads
    assert "not whole attention heads" in compat_tp.refusal("layers.*.self_attn.q_proj", q, "RowwiseParallel")
    assert "does not recognise" in compat_tp.refusal("layers.*.mlp", torch.nn.Linear(8, 8), "FancyParallel")
    # a style laying its input out along the sequence (Shard(1)), as torch's sequence-parallel plans do
    from torch.distributed.tensor import Shard

    sequence = styles.ColwiseParallel(input_layouts=Shard(1))
    module = torch.nn.Linear(8, 8)
    styles.TensorParallelLayer.install_forward(sequence, module, None)
    module._is_hooked = True
    assert "split along the batch or the sequence" in compat_tp.refusal("layers.*.mlp.up_proj", module,
                                                                        "ColwiseParallel")
