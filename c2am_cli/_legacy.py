"""The flat module paths of c2am 0.1 (`c2am_cli.model`, `c2am_cli.infer`, ...), kept for one release.

Importing one of them (or, for `data` and `hub`, which are packages now, taking one of the old names
from it) works as before and raises a DeprecationWarning that names the new module. No file sits at the old
paths: a finder on `sys.meta_path` answers for them. This module imports nothing of the package itself.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old module -> the modules that hold its names now (looked up in this order)
    "c2am_cli.errors": ("c2am_cli.runtime.errors",),
    "c2am_cli.io": ("c2am_cli.runtime.io",),
    "c2am_cli.distributed": ("c2am_cli.runtime.distributed",),
    "c2am_cli.datasets": ("c2am_cli.data.datasets",),
    "c2am_cli.model": ("c2am_cli.models.c2am",),
    "c2am_cli.loss": ("c2am_cli.models.loss",),
    "c2am_cli.registry": ("c2am_cli.hub.registry", "c2am_cli.hub.download", "c2am_cli.hub.card", "c2am_cli.hub.push"),
    "c2am_cli.boxes": ("c2am_cli.maps.boxes",),
    "c2am_cli.edges": ("c2am_cli.maps.edges",),
    "c2am_cli.calibration": ("c2am_cli.eval.calibrate", "c2am_cli.maps.calibration"),
    "c2am_cli.metrics": ("c2am_cli.eval.metrics",),
    "c2am_cli.evaluate": ("c2am_cli.eval.evaluate", "c2am_cli.eval.sources", "c2am_cli.eval.run", "c2am_cli.eval.plots"),
    "c2am_cli.infer": ("c2am_cli.predict.localize", "c2am_cli.predict.predictor", "c2am_cli.runtime.exits"),
    "c2am_cli.refine": ("c2am_cli.wsss.refine", "c2am_cli.wsss.cam_files", "c2am_cli.runtime.exits"),
    "c2am_cli.cams": ("c2am_cli.wsss.cams",),
    "c2am_cli.train": ("c2am_cli.training.trainer", "c2am_cli.runtime.device"),
}
RENAMED = {"c2am_cli.train._autocast": "c2am_cli.runtime.device.autocast"}  # old name -> its new module.name
PACKAGES = {  # old modules whose name is a package now: the old names are taken from these modules
    "c2am_cli.data": ("c2am_cli.data.images",),
    "c2am_cli.hub": ("c2am_cli.hub.resolve", "c2am_cli.hub.backbone_weights", "c2am_cli.hub.registry"),
}


_OWN = {__file__, __file__.replace("_legacy.py", "__init__.py")}  # this module, and the package's __getattr__


def _caller_stacklevel() -> int:
    """The stacklevel, for a warning raised in `_warn`, of the first frame outside this module and the import
    machinery (warnings itself skips, without counting them, the frames of importlib._bootstrap)."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name in _OWN or "importlib" in name):
            break
        frame = frame.f_back
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
    return level


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and goes in the next release: import it from {new}", DeprecationWarning,
                  stacklevel=_caller_stacklevel())


def _existing(names: tuple[str, ...]) -> list[types.ModuleType]:
    out = []
    for name in names:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return out


def _lookup(old: str, targets: tuple[str, ...], attr: str):
    if f"{old}.{attr}" in RENAMED:
        module, name = RENAMED[f"{old}.{attr}"].rsplit(".", 1)
        module = importlib.import_module(module)
        return module, getattr(module, name)
    for module in _existing(targets):
        if hasattr(module, attr):
            return module, getattr(module, attr)
    raise AttributeError(f"module {old!r} has no attribute {attr!r}")


def package_getattr(package: str):
    """A module `__getattr__` for a package that took an old module's name: the old names, with a warning."""
    targets = PACKAGES[package]

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        module, value = _lookup(package, targets, attr)
        _warn(f"{package}.{attr}", module.__name__)
        return value

    return __getattr__


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers for the old module paths only."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        targets = MOVED[spec.name]
        modules = _existing(targets)
        _warn(spec.name, " / ".join(m.__name__ for m in modules))
        if len(modules) == 1:
            return modules[0]  # the module itself, so that its names (and patches of them) are shared
        shim = types.ModuleType(spec.name, f"Deprecated: the names of {spec.name} now live in "
                                           f"{', '.join(m.__name__ for m in modules)}.")
        shim.__getattr__ = lambda attr: _lookup(spec.name, targets, attr)[1]
        return shim

    def exec_module(self, module):
        pass


_FINDER = _Finder()


class _Package(types.ModuleType):
    """The top package: an old module path imported as `c2am_cli.train` or `c2am_cli.refine` does not replace the
    public function of that name (as in 0.1, where the function was bound after its module)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in self._PUBLIC and f"{self.__name__}.{name}" in MOVED:
            return
        super().__setattr__(name, value)


def install(package: str, public: dict) -> None:
    """Answer for the old module paths, and keep the package's public names from being shadowed by them."""
    if not any(f is _FINDER for f in sys.meta_path):
        sys.meta_path.append(_FINDER)
    module = sys.modules[package]
    module._PUBLIC = public
    module.__class__ = _Package


def attribute(name: str):
    """`c2am_cli.<old module>` reached as an attribute: imported (with its warning) on first use."""
    full = f"c2am_cli.{name}"
    if full not in MOVED:
        raise AttributeError(f"module 'c2am_cli' has no attribute {name!r}")
    return importlib.import_module(full)
