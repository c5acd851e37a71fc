"""Shards with corrupt images train to the end; the summary and the log count the skipped samples."""
import json

from _train_testutils import read_log, tiny_recipe


def _shard(path):
    """20 samples: 16 good, 2 with garbage bytes as PNG, 2 with a truncated PNG (no shuffling in the
    test, so all 4 bad ones come before the 16th good one)."""
    from qlip.data.shapes import _encode_sample, write_tar
    samples = []
    for i in range(20):
        key, fields = _encode_sample(i, 32, 0, "train")
        if i in (0, 10):
            fields["png"] = b"\x89PNG\r\n\x1a\n this is not an image" + bytes(range(256))
        elif i in (5, 15):
            fields["png"] = fields["png"][: len(fields["png"]) // 2]
        samples.append((key, fields))
    write_tar(str(path), samples)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from qlip.train.recipe import Recipe
    from qlip.train import train
    _shard(tmp_path / "bad-000000.tar")
    d = tiny_recipe(tmp_path, optim={"steps": 2}, train={"ckpt_every": 0})
    d["data"].update(train=str(tmp_path / "bad-000000.tar"), shuffle_buffer=0)
    summary = train(Recipe.from_dict(d), str(tmp_path / "run"))
    assert summary["steps"] == 2 and summary["stopped_by"] == "steps"
    assert summary["skipped_samples"] == 4
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["skipped_samples"] == 4
    log = read_log(tmp_path / "run")
    assert log[-1]["skipped"] == 4 and all(r["loss"] == r["loss"] for r in log)  # finite, no NaN
