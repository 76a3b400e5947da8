"""The package's shape: layers without cycles, small modules, a cheap import, the deprecated flat paths."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "c2am_cli"
MAX_LINES = 500


def test_old_flat_module_paths_warn_and_reexport(monkeypatch):
    import c2am_cli
    from c2am_cli.data.images import load_image
    from c2am_cli.models.c2am import C2AM

    monkeypatch.delitem(sys.modules, "c2am_cli.model", raising=False)
    if "model" in vars(c2am_cli):  # (hasattr would import it)
        monkeypatch.delattr(c2am_cli, "model")
    with pytest.warns(DeprecationWarning, match=r"c2am_cli\.model is deprecated.*c2am_cli\.models\.c2am"):
        import c2am_cli.model as old
    assert old.C2AM is C2AM
    with pytest.warns(DeprecationWarning, match=r"c2am_cli\.data\.load_image is deprecated.*c2am_cli\.data\.images"):
        from c2am_cli.data import load_image as old_load_image
    assert old_load_image is load_image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from c2am_cli.data import images  # noqa: F401  (a submodule is no deprecated name)
