"""benchmarks/um3_recipe.py on a tiny stand-in demo: one run trains, is scored on the validation
split (not the test split), and its settings and figures are logged."""
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_um3_recipe_benchmark_scores_on_validation(tmp_path):
    import qlip
    from qlip.data.shapes import generate_shapes
    demo = tmp_path / "demo"
    torch.manual_seed(0)
    m = qlip.load("qlip-tiny", pretrained=False)
    m.drop_text()
    m.save_pretrained(str(demo / "qlip"))
    generate_shapes(str(demo / "data"), n=48, size=32, shard_size=48, heldout_n=8, val_n=6, progress=False)
    (demo / "demo-run.json").write_text('{"fast": false}')
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "um3_recipe.py"), "--demo-dir", str(demo), "--out", str(out),
           "--tag", "t", "--steps", "2", "--loss-average", "rows", "--rT", "0.1", "--i2t-share", "0.25", "--batch-size", "4", "--dim", "32", "--layers", "1", "--ffn", "64",
           "--warmup", "1", "--calm-down-steps", "1", "--test-images", "6", "--draws-per-class", "1",
           "--train-shards", "1", "--visual-init", "bits", "--visual-bits", "--corpus-sentences", "300",
           "--i2t-image-loss"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=REPO)
    entry = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert entry["tag"] == "t" and entry["run"] == "um3" and entry["steps"] == 2 and entry["visual_init"] == "bits"
    assert entry["loss_average"] == "rows" and entry["rT"] == 0.1 and entry["i2t_share"] == 0.25
    assert entry["seed"] == 0 and entry["draw_seed"] == 1  # recipes are chosen on other drawings than the demo reports (seed 0)
    assert entry["corpus_sentences"] == 300 and next(out.glob("shared-*")).name.endswith("-c300")
    assert entry["visual_bits"] is True  # trained with the learned bit vectors, saved folded, scored
    assert entry["i2t_image_loss"] is True and "i2t_image_loss: true" in (out / "t" / "runs" / "um3" / "recipe.yaml").read_text()
    assert entry["top_k"] == 200 and entry["temperature"] == 1.0 and entry["caption_cfg"] == 1.0
    assert entry["layout"] == "token" and "layout: token" in (out / "t" / "runs" / "um3" / "recipe.yaml").read_text()
    assert entry["eval_split"] == "val" and entry["eval_images"] == 6 and entry["ceiling"]["n"] == 6
    for k in ("caption_colour", "caption_kind", "draw_colour", "draw_kind", "draw_adherence_top1"):
        assert 0.0 <= entry[k] <= 1.0
    assert entry["text_ppl"] > 1.0
    test = torch.load(str(next(out.glob("shared-*")) / "data" / "test.pt"), weights_only=True)
    assert test["source"][-1] == "val" and len(test["labels"]) == 6  # the validation images, not the test split
    # --reuse: the finished run is not trained again, only evaluated (here at another guidance scale)
    final = out / "t" / "runs" / "um3" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    shared = next(out.glob("shared-*"))
    assert (shared / "prepared.json").is_file()
    shards = sorted((shared / "data" / "tokens").iterdir())
    stamps = [f.stat().st_mtime_ns for f in shards]
    subprocess.run(cmd + ["--reuse", "--cfg-scale", "7", "--temperature", "0.5", "--top-k", "4", "--caption-cfg", "1"],
                   check=True, env=env, capture_output=True, text=True, cwd=REPO)
    again = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert again["cfg_scale"] == 7.0 and entry["cfg_scale"] == 5.0 and again["train_s"] is None
    assert again["temperature"] == 0.5 and again["top_k"] == 4 and again["caption_cfg"] == 1.0
    assert final.stat().st_mtime_ns == before and again["text_ppl"] == entry["text_ppl"]  # same weights
    assert again["caption_colour"] == entry["caption_colour"]  # greedy captions do not depend on guidance
    # the prepared data is reused, never rewritten (another run may be training from it)
    assert [f.stat().st_mtime_ns for f in sorted((shared / "data" / "tokens").iterdir())] == stamps
