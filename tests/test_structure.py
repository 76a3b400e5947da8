"""The package's shape: layers without cycles, small modules, a cheap import, the deprecated flat paths."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "c2am_cli"
MAX_LINES = 500


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycles_between_modules():
    """No module imports anything that imports it back, directly or through others (imports inside functions too)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("c2am_cli", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.append(graph.find_shortest_chain(importer=imported, imported=module) + (imported,))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_layers_contract_holds(monkeypatch, capsys):
    """The import-linter contract in pyproject.toml (cli > eval | training > predict | wsss | baselines > ... > runtime)."""
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    monkeypatch.chdir(REPO)
    code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_import_c2am_cli_does_not_import_torch():
    code = "import sys, c2am_cli; c2am_cli.__version__; c2am_cli.C2AMError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_load_on_first_use():
    import c2am_cli
    from c2am_cli.models.c2am import C2AM

    assert c2am_cli.C2AM is C2AM
    assert set(c2am_cli.__all__) <= set(dir(c2am_cli))
    with pytest.raises(AttributeError):
        c2am_cli.no_such_name


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


def test_cli_option_defaults_match_the_library():
    from c2am_cli.cli.options import MAX_PIXELS
    from c2am_cli.data.images import DEFAULT_MAX_PIXELS

    assert MAX_PIXELS == DEFAULT_MAX_PIXELS


def test_an_old_module_path_does_not_shadow_the_public_function(monkeypatch):
    import c2am_cli
    from c2am_cli.training.trainer import train

    monkeypatch.delitem(sys.modules, "c2am_cli.train", raising=False)
    with pytest.warns(DeprecationWarning):
        import c2am_cli.train  # noqa: F401
    assert c2am_cli.train is train
