"""`qlip demo t2i --fast` end to end on a tiny stand-in for `qlip demo`'s output (two random
qlip-tiny models, 32 px, and the tiny shapes shards): metrics.json keys and ranges, the report,
the saved generator samples through `qlip.gen` and `qlip gen sample`; a --resume rerun reuses
the token shards and the training of an unchanged tokenizer (same figures) and redoes both for a
changed one; a missing demo is one line; the sample-space gFID formula."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from qlip.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK_KEYS = {"adherence_top1", "adherence_colour", "adherence_kind", "ceiling_top1", "ceiling_colour", "ceiling_kind",
              "zero_shot_top1", "gfid", "cfg_sweep", "samples_per_s"}
FRACTIONS = BLOCK_KEYS - {"gfid", "cfg_sweep", "samples_per_s"}


def pooled(x):
    """A cheap stand-in for the FID Inception: 2 x 2 average-pooled pixels (12 features)."""
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_dir(tiny_shapes, tmp_path_factory):
    """What `qlip demo` leaves: qlip/ (with its text tower), recon_only/final/ (no text), data/."""
    import qlip
    root = tmp_path_factory.mktemp("t2i_demo") / "demo"
    torch.manual_seed(0)
    qlip.load("qlip-tiny", pretrained=False).save_pretrained(str(root / "qlip"))
    torch.manual_seed(1)
    recon = qlip.load("qlip-tiny", pretrained=False)
    recon.drop_text()
    recon.save_pretrained(str(root / "recon_only" / "final"))
    (root / "data").mkdir()
    for tar in tiny_shapes.glob("shapes-*.tar"):
        shutil.copy(tar, root / "data" / tar.name)
    return root


def test_demo_t2i_fast_end_to_end(demo_dir, tmp_path):
    import qlip.gen
    from qlip.cli import main
    from qlip.demo.t2i import FAST, run_t2i_demo
    out = tmp_path / "out"
    m = run_t2i_demo(str(demo_dir), str(out), fast=True, lanes=1, fid=pooled)
    saved = json.loads((out / "metrics.json").read_text())
    from qlip.data.shapes import single_shape_caption
    from qlip.data.tokens import TokenShardDataset
    everything = TokenShardDataset(str(out / "tokens" / "qlip"))
    n_single = sum(single_shape_caption(str(c)) for c in everything.captions)
    assert 0 < n_single < len(everything) == 32
    trained = TokenShardDataset(str(out / "tokens" / "qlip-single"))
    assert len(trained) == n_single and all(single_shape_caption(str(c)) for c in trained.captions)
    assert {"qlip", "recon_only", "settings", "timings_s", "details"} <= set(saved)
    for name in ("qlip", "recon_only"):
        block = saved[name]
        assert set(block) == BLOCK_KEYS
        assert all(0.0 <= block[k] <= 1.0 for k in FRACTIONS), block
        assert [r[0] for r in block["cfg_sweep"]] == FAST["cfg_sweep"]
        assert all(len(r) == 3 and 0 <= r[1] <= r[2] <= 1 for r in block["cfg_sweep"])  # top-1 needs the colour
        # the sweep's row at the default CFG is the headline figure (same samples)
        row = next(r for r in block["cfg_sweep"] if r[0] == FAST["cfg"])
        assert row[1:] == [block["adherence_top1"], block["adherence_colour"]]
        assert block["adherence_top1"] <= min(block["adherence_colour"], block["adherence_kind"])
        assert isinstance(block["gfid"], float) and block["gfid"] >= 0
        assert block["samples_per_s"] > 0
        assert saved["details"][name]["train_steps"] == FAST["steps"]
        tokens = saved["details"][name]["tokens"]
        assert tokens["images_tokenized"] == 32 and tokens["images"] == n_single  # trained on single shapes
        assert 0 < tokens["distinct_ids"] <= 16 * n_single
    assert saved["settings"]["samples"] == 32 * FAST["samples_per_prompt"]
    assert saved["settings"]["ceiling_n_real"] == FAST["ceiling_n"]
    assert saved["qlip"] == json.loads(json.dumps(m["qlip"]))
    page = (out / "report.html").read_text()
    assert "a photo of a black star" in page and "CFG sweep" in page and page.count("<img") >= 2 * 32
    # the saved generator (a): loads, samples and decodes with qlip.gen and through `qlip gen sample`
    gen = qlip.gen.load(str(out / "qlip"))
    assert gen.meta["text"]["encoder"] == "embedding" and (gen.model.cfg.head, gen.model.cfg.groups) == ("intra", 4)
    ids = gen.generate(["a photo of a red circle"], n=2, cfg=4.0, seed=0)
    assert ids.shape == (2, 4, 4)
    images = gen.decode(ids)
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert main(["gen", "sample", "--model", str(out / "qlip"), "--prompt", "a photo of a red circle", "-n", "2",
                 "-o", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "p000-001.png").is_file()
    # --resume with another reconstruction-only model: the QLIP lane reuses its token shards and its
    # training (same seeds -> the same samples and figures); the other lane tokenizes and trains anew
    import qlip
    torch.manual_seed(2)
    other = qlip.load("qlip-tiny", pretrained=False)
    other.drop_text()
    other.save_pretrained(str(tmp_path / "other_recon"))
    again = run_t2i_demo(str(demo_dir), str(out), fast=True, lanes=1, resume=True, fid=pooled,
                         recon_path=str(tmp_path / "other_recon"))
    t = again["details"]["qlip"]["tokens"]
    assert t["parts_written"] == 0 and t["parts_reused"] == 1
    for k in BLOCK_KEYS - {"samples_per_s"}:
        assert again["qlip"][k] == m["qlip"][k], k
    t, before = again["details"]["recon_only"]["tokens"], m["details"]["recon_only"]["tokens"]
    assert t["parts_written"] == 1 and t["parts_reused"] == 0 and t["fingerprint"] != before["fingerprint"]
    run = json.loads((out / "runs" / "recon_only" / "demo-t2i-run.json").read_text())
    assert run["tokens"] == t["fingerprint"]  # trained again, on the new shards
    old = json.loads((out / "runs" / "recon_only.previous" / "demo-t2i-run.json").read_text())
    assert old["tokens"] == before["fingerprint"]  # the stale run moved aside, not deleted


def test_stale_generator_run_names_what_changed(tmp_path):
    from qlip.demo.t2i import _run_changes
    run = tmp_path / "run"
    ident = {"recipe": {"optim": {"lr": 1e-3, "steps": 10}, "head": {"kind": "split"}}, "tokens": "abc",
             "text_model": [1, 2]}
    assert _run_changes(str(run / "demo-t2i-run.json"), ident) == []  # nothing there
    run.mkdir()
    assert _run_changes(str(run / "demo-t2i-run.json"), ident) == ["no record of what it was trained with (demo-t2i-run.json)"]
    (run / "demo-t2i-run.json").write_text(json.dumps(ident))
    assert _run_changes(str(run / "demo-t2i-run.json"), ident) == []
    new = {"recipe": {"optim": {"lr": 2e-3, "steps": 10}, "head": {"kind": "split"}}, "tokens": "abd",
           "text_model": [1, 2]}
    assert _run_changes(str(run / "demo-t2i-run.json"), new) == ["optim.lr: 0.001 -> 0.002", "the token shards changed"]


def test_missing_demo_is_a_one_line_error(tmp_path, demo_dir):
    from qlip.demo.t2i import run_t2i_demo
    with pytest.raises(ConfigError, match="run `qlip demo` first") as e:
        run_t2i_demo(str(tmp_path / "nowhere"), str(tmp_path / "out"), fast=True)
    assert "\n" not in str(e.value) and "nowhere" in str(e.value)
    # models present, data missing: also one line
    bare = tmp_path / "bare"
    shutil.copytree(demo_dir / "qlip", bare / "qlip")
    shutil.copytree(demo_dir / "recon_only", bare / "recon_only")
    with pytest.raises(ConfigError, match="no shapes data") as e:
        run_t2i_demo(str(bare), str(tmp_path / "out"), fast=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n1,n2,d", [(40, 30, 16), (9, 12, 64)])
def test_gfid_equals_the_frechet_distance_of_mean_and_covariance(n1, n2, d):
    """The sample-space formula (fewer samples than dimensions) == the 2048-d eigen route."""
    from qlip.demo.t2i import gfid
    from qlip.eval.recon import frechet_distance
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n1, d)), rng.normal(0.3, 1.5, size=(n2, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    want = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert gfid(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)
    assert gfid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_t2i_recipe_benchmark_screens_one_variant(demo_dir, tmp_path):
    """benchmarks/t2i_recipe.py: a variant trains on the t2i demo's QLIP token shards, is judged on
    another sampling seed than the demo's, and appends one row; a missing demo is one line."""
    import importlib.util

    from qlip.demo.t2i import tokenize
    t2i_dir = tmp_path / "t2i"
    tokenize(str(demo_dir / "qlip"), str(demo_dir / "data" / "shapes-train-*.tar"), str(t2i_dir / "tokens" / "qlip"))
    spec = importlib.util.spec_from_file_location("t2i_recipe", os.path.join(REPO, "benchmarks", "t2i_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--demo-dir", str(demo_dir), "--t2i-dir", str(t2i_dir), "--out", str(tmp_path / "b"), "--tag", "lr3e-3",
            "--lr", "3e-3", "--steps", "2", "--batch", "4", "--samples", "1"]
    assert mod.main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["tag"] == "lr3e-3" and rows[0]["steps"] == 2 and rows[0]["lr"] == 3e-3
    assert rows[0]["sample_seed"] == 1 and rows[0]["head"] == {"kind": "intra", "groups": 4}
    assert rows[0]["text_encoder"] == "embedding"  # the demo's defaults
    meta = json.loads((tmp_path / "b" / "lr3e-3" / "final" / "config.json").read_text())
    assert meta["text"]["encoder"] == "embedding" and meta["config"]["text_vocab"] == 49408
    assert all(0.0 <= rows[0][k] <= 1.0 for k in ("adherence_top1", "adherence_colour", "adherence_kind"))
    assert (tmp_path / "b" / "lr3e-3" / "samples").is_dir()
    assert rows[0]["precision"] in ("fp32", "bf16") and rows[0]["pooled"] is False
    assert all(np.isfinite(rows[0][k]) for k in ("nll_true", "caption_gain", "caption_gain_shuffled"))
    assert 0.0 <= rows[0]["novel_ids"] <= 1.0 and rows[0]["train_distinct_ids"] > 1
    # the demo's training rows: the single-shape images only (--all-shapes: every image)
    from qlip.data.shapes import single_shape_caption
    from qlip.data.tokens import TokenShardDataset
    trained = TokenShardDataset(str(tmp_path / "b" / "tokens" / "lr3e-3"))
    assert rows[0]["single_shapes"] is True and 0 < len(trained) < len(TokenShardDataset(str(t2i_dir / "tokens" / "qlip")))
    assert all(single_shape_caption(str(c)) for c in trained.captions)
    assert rows[0]["train_distinct_ids"] == len(np.unique(np.asarray(trained.ids[np.arange(len(trained))])))
    tokens = str(t2i_dir / "tokens" / "qlip")
    ds = TokenShardDataset(tokens)
    train = np.asarray(ds.ids[np.arange(3)]).astype(np.int64)
    every = set(np.asarray(ds.ids[np.arange(len(ds))]).ravel().tolist())
    unseen = next(i for i in range(1 << 20) if i not in every)
    assert mod.novel_ids(train, tokens)["novel_ids"] == 0.0  # ids of training images are never novel
    assert mod.novel_ids(np.array([train[0, 0], unseen, unseen, train[1, 1]]), tokens)["novel_ids"] == 0.5
    # --top-k 1: every sub-token its most likely value, so the samples of one prompt are all the same
    # image (left and right half of each 2-sample strip); the finished generator is reused, not retrained
    from PIL import Image

    def halves_equal():
        strips = sorted((tmp_path / "b" / "lr3e-3" / "samples").glob("*.png"))
        assert len(strips) == 32  # one per prompt: neither answer below may come from no strips at all
        halves = [np.asarray(Image.open(f)) for f in strips]
        return all(np.array_equal(a[:, :a.shape[1] // 2], a[:, a.shape[1] // 2:]) for a in halves)
    assert mod.main(args[:-1] + ["2", "--resume", "--top-k", "1", "--temperature", "0.5"]) == 0
    row = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[-1])
    assert row["top_k"] == 1 and row["temperature"] == 0.5 and row["steps"] == 2 and halves_equal()
    assert mod.main(args[:-1] + ["2", "--resume"]) == 0  # sampled at the demo's temperature 1, all values
    assert json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[-1])["top_k"] is None
    assert not halves_equal()
    assert mod.main(args[:7] + ["pooled", "--text-encoder", "qlip", "--pooled", "--precision", "fp32",
                                "--dim", "48", "--layers", "1", "--heads", "2", "--ffn", "64"] + args[10:]) == 0
    row = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[-1])
    assert row["tag"] == "pooled" and row["pooled"] is True and row["precision"] == "fp32"
    assert row["model"] == {"preset": "gpt-demo", "dim": 48, "n_layers": 1, "n_heads": 2, "ffn_hidden": 64}
    assert row["text_encoder"] == "qlip"
    meta = json.loads((tmp_path / "b" / "pooled" / "final" / "config.json").read_text())
    assert meta["config"]["dim"] == 48 and meta["config"]["n_layers"] == 1  # the size flags reach the model
    assert meta["text"]["pooled"] is True and meta["config"]["text_dim"] > 0 and meta["config"]["text_vocab"] == 0
    with pytest.raises(SystemExit, match="qlip demo t2i"):
        mod.main(["--demo-dir", str(demo_dir), "--t2i-dir", str(tmp_path / "none"), "--out", str(tmp_path / "c"),
                  "--tag", "x"])
