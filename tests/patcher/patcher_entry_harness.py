"""Runs one LLaVA entry point as ``__main__`` on a CPU-only machine and writes what the test checks.

    python patcher_entry_harness.py STATS_JSON MODULE [ARGS...]

Not a test (pytest does not collect it). It stands in for what a GPU machine has and this one lacks,
and nothing more: optional third-party modules the scripts import but do not use here (``requests``
for image URLs, ``shortuuid`` for answer ids) are stubbed when missing, and the scripts' hard-coded
``cuda`` device is mapped to the CPU. It never imports or enables meteor_plugin before the script runs:
that is the patched entry point's job, and STATS_JSON records whether it happened.
"""

import json
import os
import runpy
import sys
import types


def _stub_missing(name, **attrs):
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def _cuda_to_cpu():
    import torch

    def swap(value):
        return "cpu" if isinstance(value, str) and value.startswith("cuda") else value

    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = swap(kwargs["device"])
        return original_to(self, *(swap(a) for a in args), **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def main():
    stats_path, module = sys.argv[1], sys.argv[2]
    _stub_missing("requests")
    _stub_missing("shortuuid", uuid=lambda: "answer-id")
    _cuda_to_cpu()
    assert "meteor_plugin" not in sys.modules
    import llava.model.builder as builder

    report = {"llava_file": os.path.abspath(sys.modules["llava"].__file__), "loads": []}
    original_load = builder.load_pretrained_model
    models = []

    def load_pretrained_model(*args, **kwargs):
        # What the entry point did before loading: was the plugin imported and enabled by then?
        plugin = sys.modules.get("meteor_plugin")
        report["loads"].append({"plugin_enabled": bool(plugin and plugin.is_enabled())})
        result = original_load(*args, **kwargs)
        models.append(result[1])
        return result

    builder.load_pretrained_model = load_pretrained_model
    sys.argv = [module] + sys.argv[3:]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        plugin = sys.modules.get("meteor_plugin")
        found = plugin.stats(models[-1]) if plugin and models else None
        report["stats"] = found.to_dict() if found is not None else None
        report["argv_seen_by_script"] = sys.argv[1:]
        with open(stats_path, "w") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main()
