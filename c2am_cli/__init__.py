"""c2am: class-agnostic activation maps (C2AM, CVPR 2022) learned from unlabeled images.

The public names below load on first use (PEP 562), so `import c2am_cli` imports neither torch nor timm; each
subpackage holds one stage of the data flow (data, models, hub, maps, predict, training, eval, wsss, cli, runtime).
"""
import importlib

from . import _legacy
from .runtime.version import __version__

_PUBLIC = {  # name -> the module that defines it
    "C2AM": "c2am_cli.models.c2am",
    "C2AMConfig": "c2am_cli.config",
    "ModelConfig": "c2am_cli.config",
    "TrainConfig": "c2am_cli.config",
    "C2AMError": "c2am_cli.runtime.errors",
    "ImageError": "c2am_cli.runtime.errors",
    "Predictor": "c2am_cli.predict.predictor",
    "Result": "c2am_cli.predict.predictor",
    "Localizer": "c2am_cli.predict.localize",
    "LocalizeSummary": "c2am_cli.predict.localize",
    "localize": "c2am_cli.predict.localize",
    "train": "c2am_cli.training.trainer",
    "calibrate": "c2am_cli.eval.calibrate",
    "Refiner": "c2am_cli.wsss.refine",
    "refine": "c2am_cli.wsss.refine",
}
__all__ = [*_PUBLIC, "__version__"]

_legacy.install(__name__, _PUBLIC)  # the flat module paths of 0.1 (c2am_cli.model, ...), deprecated


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    return _legacy.attribute(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
