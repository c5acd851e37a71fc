"""The import direction of docs/design.md, checked with import-linter's layers contract
(``[tool.importlinter]`` in pyproject.toml): the package keeps it, and a copy of the package with
one upward import (lazy, inside a function) breaks it, naming the offending line."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import importlinter  # noqa: F401  (the test extra installs it: pip install -e ".[test]")

REPO = pathlib.Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))")  # import-linter 2.5 (Python 3.9) on


def _lint(package_parent: pathlib.Path, config: pathlib.Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the ``qlip`` package found in ``package_parent`` (first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    r = subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=package_parent, env=env,
                       capture_output=True, text=True, timeout=120)
    r.stdout = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)  # import-linter 2.5 colours its report
    return r


def _copy_package(dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(REPO / "qlip", dst / "qlip", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_package_keeps_the_layer_order(tmp_path):
    r = _lint(_copy_package(tmp_path), tmp_path / "pyproject.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout
    assert "qlip layers (docs/design.md) KEPT" in r.stdout and "the training engine is model-agnostic KEPT" in r.stdout


def test_an_upward_lazy_import_breaks_the_contract(tmp_path):
    """model sits below io: a function-level ``from ..io import load`` in the model must fail."""
    pkg = _copy_package(tmp_path)
    config = pkg / "qlip" / "model" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from ..io import load\n    return load\n")
    r = _lint(pkg, pkg / "pyproject.toml")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "qlip.model is not allowed to import qlip.io" in r.stdout
    assert "qlip.model.config -> qlip.io" in r.stdout


def test_a_new_top_level_package_must_be_placed(tmp_path):
    """exhaustive = true: a top-level module the contract does not list breaks it."""
    pkg = _copy_package(tmp_path)
    (pkg / "qlip" / "newarea").mkdir()
    (pkg / "qlip" / "newarea" / "__init__.py").write_text("")
    r = _lint(pkg, pkg / "pyproject.toml")
    assert r.returncode == 1 and "qlip.newarea" in r.stdout, r.stdout + r.stderr


def test_the_engine_may_not_import_a_model(tmp_path):
    """The engine knows no model: a direct import of qlip.model in qlip/train/engine.py breaks the
    second contract (the layers alone would allow it: train sits above model)."""
    pkg = _copy_package(tmp_path)
    engine = pkg / "qlip" / "train" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _peek():\n    from ..model import QLIP\n    return QLIP\n")
    r = _lint(pkg, pkg / "pyproject.toml")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the training engine is model-agnostic BROKEN" in r.stdout and "qlip.train.engine -> qlip.model" in r.stdout
