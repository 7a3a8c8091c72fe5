"""EAGLE (NVlabs/EAGLE at fef95f1, not on PyPI; PyPI's ``eagle`` is an unrelated GUI library, so EAGLE is recognised
by its model file, not its name).

    encoders.py    its vision encoders: names, widths, and each one as the stages run it
    inference.py   what ``enable()`` patches: the ``*_arch.py`` wrappers and Stages 1-2 on its multi-encoder tower
    conversion.py  METEOR's per-encoder projectors: on a model, on a checkpoint's files, when one loads
    training.py    what training, conversion and calibration need of its code (``TRAINING``)
    patches.py     the edits ``meteor-plugin patch`` makes to a checkout (``PATCHER``)
"""

from ..family import Family
from .conversion import convert_to_post_projection
from .inference import TARGET
from .patches import PATCHER
from .training import TRAINING

FAMILY = Family(name="eagle", target=TARGET, training=TRAINING, patcher=PATCHER)

__all__ = ["FAMILY", "TARGET", "TRAINING", "PATCHER", "convert_to_post_projection"]
