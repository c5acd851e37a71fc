"""benchmarks/um3_layout.py on a tiny model: both layouts train and draw, the token layout's rows are
groups-times shorter, and the ratios are printed."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_layout_benchmark_measures_both_layouts(capsys):
    spec = importlib.util.spec_from_file_location("um3_layout", os.path.join(REPO, "benchmarks", "um3_layout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--dim", "32", "--layers", "1", "--ffn", "64", "--grid", "2", "--steps", "2", "--warmup", "1",
                     "--draws", "2", "--batch", "2", "--caption", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    sub, tok, ratio = lines
    assert (sub["layout"], tok["layout"]) == ("subtoken", "token")
    assert sub["positions_per_image"] == 4 * 4 and tok["positions_per_image"] == 4     # 2 x 2 tokens, 4 sub-tokens each
    assert sub["seq_len"] - tok["seq_len"] == 12
    assert tok["params"] > sub["params"]  # the chain
    assert ratio["step_time_ratio_subtoken_over_token"] > 0 and ratio["drawing_speed_ratio_token_over_subtoken"] > 0
