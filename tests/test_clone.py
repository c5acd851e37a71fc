"""A plain clone runs the whole suite: test data lives inside the repository (issue 10, item 5)."""
import pathlib
import re
import subprocess

from conftest import FIXTURES

REPO = pathlib.Path(__file__).resolve().parents[1]
# what tests/test_official_compat.py reads
NEEDED = [f"{v}/{f}" for v in ("eva", "clip")
          for f in ("config.json", "model.safetensors", "reference_fp32.npz", "reference_fp64.npz")]
NEEDED.append("eva/summary.json")


def test_official_fixtures_are_inside_the_repository():
    assert FIXTURES.resolve().is_relative_to(REPO)
    for name in NEEDED:
        assert (FIXTURES / name).is_file(), name
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 25 * 2 ** 20  # only what the tests read
    if (REPO / ".git").exists():  # and git would commit them
        ignored = subprocess.run(["git", "check-ignore", *NEEDED], cwd=FIXTURES, capture_output=True, text=True)
        assert ignored.stdout == "", ignored.stdout


def test_no_test_reads_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work" + "/|shared/fixtures")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("*.py")
                 if p.name != "test_clone.py" and outside.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
