"""A one-line description of where a benchmark ran."""

from __future__ import annotations

import os
import platform

import torch


def describe(device: torch.device) -> str:
    import transformers

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        what = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        what = f"{what}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return f"{what}; torch {torch.__version__}, transformers {transformers.__version__}"
