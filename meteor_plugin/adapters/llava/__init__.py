"""The llava package (haotian-liu/LLaVA at c121f04, PyPI ``llava-torch`` 1.2.2): LLaVA-1.5 and 1.6, on
Vicuna/Llama and Mistral.

    inference.py  what ``enable()`` patches: the ``*_arch.py`` wrappers and Stage 1 inside its CLIP tower
    training.py   what training, conversion and calibration need of its code (``TRAINING``)
    patches.py    the edits ``meteor-plugin patch`` makes to a checkout (``PATCHER``)
"""

from ..family import Family
from .inference import TARGET
from .patches import PATCHER
from .training import TRAINING

FAMILY = Family(name="llava", target=TARGET, training=TRAINING, patcher=PATCHER)
