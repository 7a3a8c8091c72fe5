import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, here and in the subprocesses the tests start (set before torch is imported): the tests' models are
# tiny, and a second thread on a busy machine spins instead of working (tests/adapters/hf_llava/test_llava.py ran
# 212 s at two threads against 10 s at one on 2 shared cores). METEOR_TEST_THREADS=N to choose.
THREADS = os.environ.get("METEOR_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

import meteor_plugin  # noqa: E402

torch.set_num_threads(int(THREADS))


@pytest.fixture(autouse=True)
def _plugin_off():
    """Every test starts and ends with nothing patched: no pruning, and no training change to upstream code."""
    from meteor_plugin.training import hooks

    meteor_plugin.disable()
    hooks.uninstall()
    yield
    meteor_plugin.disable()
    hooks.uninstall()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def eagle():
    """A builder of the EAGLE stand-in: ``eagle(converted=False, **TinyEagleSpec fields)``."""
    def make(converted=False, **fields):
        from meteor_plugin.adapters.eagle import convert_to_post_projection
        from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle

        model = build_tiny_eagle(TinyEagleSpec(**fields))
        if converted:
            convert_to_post_projection(model)
        model.generation_config.eos_token_id = None
        return model

    return make


@pytest.fixture
def tiny_llava(model_dir):
    """Factory: tiny_llava(**TinyLlavaSpec fields) -> LlavaLlamaForCausalLM (eval, seeded), or
    LlavaMistralForCausalLM with language="mistral"."""
    from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava

    def make(**fields):
        return build_tiny_llava(TinyLlavaSpec(**fields), folder=model_dir)

    return make
