"""The areas' commands (data, train, eval, demo) are registered by importing their ``cli``
modules plainly: a broken import of our own code is an error, never a silently missing command."""
import subprocess
import sys

import pytest

from qlip.cli import build_parser


def test_every_area_registers_its_commands():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert {"data", "train", "balance", "eval", "demo"} <= set(sub.choices)
    args = p.parse_args(["demo", "--fast", "--resume", "--threads", "2", "--lanes", "1", "--out", "x"])
    assert (args.out, args.fast, args.resume, args.threads, args.lanes) == ("x", True, True, 2, 1)
    assert args.func.__module__ == "qlip.demo.cli"
    args = p.parse_args(["demo"])  # no argument: the defaults of `qlip demo`
    assert (args.out, args.fast, args.resume, args.threads, args.lanes) == ("runs/demo", False, False, None, None)


def test_a_broken_area_import_is_an_error_not_a_missing_command(monkeypatch):
    """Simulate a broken qlip module: importing qlip.eval.cli raises ModuleNotFoundError for a
    qlip name. The parser must not be built without `qlip eval`."""
    import qlip.eval
    monkeypatch.delattr(qlip.eval, "cli", raising=False)
    monkeypatch.setitem(sys.modules, "qlip.eval.cli", None)  # import of qlip.eval.cli -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match="qlip.eval.cli"):
        build_parser()


def test_building_the_parser_imports_no_optional_dependency():
    """Optional packages (the train / eval extras) are imported inside the handlers that need
    them, so a missing extra fails only its command, never the whole `qlip` command."""
    optional = ["lpips", "timm", "webdataset", "torchmetrics", "matplotlib", "scipy", "skimage", "tensorboard"]
    code = ("import sys; from qlip.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {optional!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
