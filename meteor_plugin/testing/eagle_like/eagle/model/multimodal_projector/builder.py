"""``build_vision_projector``: LLaVA's projector factory with EAGLE's extra (ignored) ``fpn_input_dim``."""

import re

import torch.nn as nn


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load=False, fpn_input_dim=[], **kwargs):  # noqa: B006 (EAGLE's signature)
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    mlp = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if mlp:
        # mlpNx_gelu: Linear(mm_hidden -> hidden), then (GELU, Linear(hidden -> hidden)) N-1 times.
        layers = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(int(mlp.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        return IdentityMap()
    raise ValueError(f"Unknown projector type: {projector_type}")
