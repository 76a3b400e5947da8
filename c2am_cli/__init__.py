"""c2am: class-agnostic activation maps (C2AM, CVPR 2022) learned from unlabeled images."""
from .runtime.version import __version__

from . import _legacy  # noqa: E402

_legacy.install()  # the flat module paths of 0.1 (c2am_cli.model, ...), deprecated

from .eval.calibrate import calibrate  # noqa: E402
from .config import C2AMConfig, ModelConfig, TrainConfig  # noqa: E402
from .runtime.errors import C2AMError, ImageError  # noqa: E402
from .predict.localize import Localizer, LocalizeSummary, localize  # noqa: E402
from .models.c2am import C2AM  # noqa: E402
from .wsss.refine import Refiner, refine  # noqa: E402
from .training.trainer import train  # noqa: E402

__all__ = ["C2AM", "C2AMConfig", "ModelConfig", "TrainConfig", "C2AMError", "ImageError", "Localizer",
           "LocalizeSummary", "localize", "train", "calibrate", "Refiner", "refine", "__version__"]


def __getattr__(name: str):
    return _legacy.attribute(name)
