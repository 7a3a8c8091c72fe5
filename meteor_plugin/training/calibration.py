"""The calibration hook of ``meteor-plugin convert --calibration-images DIR``.

Calibration measures, on a few images, each encoder's numerical rank (Stage 1's budget split) and the
``llm_lambda`` that gives a target average of kept tokens (Stage 3). It belongs to the Stage 1 code
(``meteor-plugin calibrate``), which registers it here:

    from meteor_plugin.training import calibration
    calibration.set_calibrator(fn)   # fn(model_path: str, images_dir: str, config: MeteorConfig) -> MeteorConfig

or names it in ``DEFAULT`` (``"module:function"``, imported only when a conversion asks for calibration).
``convert`` then calls it on the copied checkpoint and stores the config it returns. Until one is
available, asking for calibration is an error: an uncalibrated config is never presented as calibrated.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..config import MeteorConfig

Calibrator = Callable[[str, str, MeteorConfig], MeteorConfig]
_CALIBRATOR: Optional[Calibrator] = None
DEFAULT: Optional[str] = "meteor_plugin.calibrate:calibrate_checkpoint"  # the Stage 1 calibrator


class CalibrationUnavailable(RuntimeError):
    pass


def set_calibrator(fn: Optional[Calibrator]) -> None:
    """Register (or, with None, remove) the function that calibrates a checkpoint."""
    global _CALIBRATOR
    _CALIBRATOR = fn


def calibrator() -> Optional[Calibrator]:
    if _CALIBRATOR is not None or DEFAULT is None:
        return _CALIBRATOR
    from .codebases import resolve

    return resolve(DEFAULT)


def calibrate(model_path: str, images_dir: str, config: MeteorConfig) -> MeteorConfig:
    fn = calibrator()
    if fn is None:
        raise CalibrationUnavailable(
            "--calibration-images: no calibrator is available in this installation (the Stage 1 code registers "
            "one with meteor_plugin.training.calibration.set_calibrator). Convert without --calibration-images: "
            "the budget is then split uniformly across encoders (a warning says so at run time)"
        )
    result = fn(model_path, images_dir, config)
    if not isinstance(result, MeteorConfig):
        raise TypeError(f"the calibrator returned {type(result).__name__}, not a MeteorConfig")
    return result
