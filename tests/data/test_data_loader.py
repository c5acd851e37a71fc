"""Image-text loader: rank/worker split, resume, corrupt samples, image modes, CSV and folder readers."""
import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.data import (csv_loader, decode_image, image_folder_loader, image_transform, webdataset_loader,
                       expand_shards)
from qlip.data.shapes import generate_shapes, write_tar
from qlip.errors import DataError


def tokenize(texts):
    """Tiny picklable stand-in for the CLIP tokenizer: (B, 77) int64."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [sum(map(ord, w)) % 1000 + 1 for w in t.split()][:77]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def png(color=(200, 40, 40), size=(24, 20), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 training shards of 12, 12, 12, 6 images (size 32) and 2 held-out shards."""
    out = str(tmp_path_factory.mktemp("shapes"))
    return generate_shapes(out, n=42, size=32, seed=0, shard_size=12, heldout_n=40, progress=False)


def all_batches(loader, limit=None):
    out = []
    for b in loader:
        out.append(b)
        if limit is not None and len(out) == limit:
            break
    return out


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world,workers,split", [(2, 2, "shard"), (3, 1, "sample"), (1, 3, "sample"), (2, 0, "shard")])
def test_every_sample_exactly_once(shards, world, workers, split):
    keys = []
    for rank in range(world):
        loader = webdataset_loader(shards["train_shards"], image_transform(32), tokenize, batch_size=5, seed=1,
                                   rank=rank, world_size=world, num_workers=workers, drop_last=False)
        assert loader.split == split
        batches = all_batches(loader)
        assert all(b["images"].shape[1:] == (3, 32, 32) and b["images"].dtype == torch.float32 for b in batches)
        assert all(b["tokens"].shape == (len(b["keys"]), 77) and b["tokens"].dtype == torch.int64 for b in batches)
        keys += keys_of(batches)
    assert sorted(keys) == [f"{i:09d}" for i in range(42)]


def test_shuffle_depends_on_seed_and_epoch(shards):
    def order(seed, epochs=1):
        loader = webdataset_loader(shards["train_shards"], image_transform(32), None, 6, seed=seed, shuffle_buffer=8)
        return [keys_of(all_batches(loader)) for _ in range(epochs)]

    e0, e1 = order(0, epochs=2)
    assert e0 == order(0)[0] and e0 != e1 and e0 != order(1)[0]
    assert sorted(e0) != e0


@pytest.mark.parametrize("workers,infinite,drop_last", [(2, True, True), (0, False, False), (2, False, True)])
def test_resume_gives_identical_batches(shards, workers, infinite, drop_last):
    kw = dict(transform=image_transform(32), tokenizer=tokenize, batch_size=5, seed=4, num_workers=workers,
              infinite=infinite, drop_last=drop_last, shuffle_buffer=10)
    n_total, n_first = 14, 7  # odd: the next batch comes from worker 1; spans an epoch boundary

    def run(loader, n):
        out = []
        while len(out) < n:  # epoch mode: keep starting epochs
            for b in loader:
                out.append(b)
                if len(out) == n:
                    break
        return out

    ref = run(webdataset_loader(shards["train_shards"], **kw), n_total)
    first = webdataset_loader(shards["train_shards"], **kw)
    run(first, n_first)
    state = first.state_dict()
    resumed = webdataset_loader(shards["train_shards"], **kw)
    resumed.load_state_dict(state)
    rest = run(resumed, n_total - n_first)
    for a, b in zip(ref[n_first:], rest):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    assert resumed.batches == n_total
    # a mismatching loader refuses the state
    other = webdataset_loader(shards["train_shards"], **{**kw, "batch_size": 4})
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(state)


def test_heldout_labels(shards):
    loader = webdataset_loader(shards["heldout_shards"], image_transform(32), tokenize, 16, label_key="cls",
                               shuffle=False, drop_last=False)
    batches = all_batches(loader)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.tolist() == [i % 32 for i in range(40)]  # unshuffled: file order


@pytest.fixture()
def corrupt_shards(tmp_path):
    good = [(f"g{i:03d}", {"png": png((10 * i, 100, 200)), "txt": f"good {i}".encode()}) for i in range(8)]
    broken = png()
    bad = [("badbytes", {"png": b"\x89PNG\r\n\x1a\n not really a png", "txt": b"x"}),
           ("truncpng", {"png": broken[: len(broken) // 2], "txt": b"x"}),
           ("notext", {"png": png()})]
    a = str(tmp_path / "a.tar")
    write_tar(a, good[:3] + bad + good[3:5])
    b = str(tmp_path / "b.tar")
    write_tar(b, good[5:] + [("big", {"png": os.urandom(20000), "txt": b"x"})])
    with open(b, "rb") as f:
        data = f.read()
    with open(b, "wb") as f:  # cut inside the last member: a truncated shard
        f.write(data[: len(data) - 12000])
    return [a, b]


def test_corrupt_samples_skipped_and_counted(corrupt_shards, caplog):
    with caplog.at_level(logging.WARNING, logger="qlip.data"):
        loader = webdataset_loader(corrupt_shards, image_transform(16), tokenize, 3, drop_last=False, split="sample")
        keys = keys_of(all_batches(loader))
    assert sorted(keys) == [f"g{i:03d}" for i in range(8)]
    assert loader.stats == {"samples": 8, "skipped": 3, "decode_errors": 2, "incomplete": 1, "shard_errors": 1}
    assert "badbytes" in caplog.text and "truncpng" in caplog.text and "notext" in caplog.text
    assert "truncated" in caplog.text


def test_resume_with_corrupt_samples_keeps_counts(corrupt_shards):
    kw = dict(transform=image_transform(16), tokenizer=tokenize, batch_size=2, drop_last=False, shuffle_buffer=4,
              infinite=True, num_workers=2)
    ref = all_batches(webdataset_loader(corrupt_shards, **kw), 8)
    first = webdataset_loader(corrupt_shards, **kw)
    all_batches(first, 3)
    resumed = webdataset_loader(corrupt_shards, **kw)
    resumed.load_state_dict([first.state_dict(), {"rank": 1}])  # a list of every rank's state
    rest = all_batches(resumed, 5)
    assert keys_of(ref[3:]) == keys_of(rest)
    straight = webdataset_loader(corrupt_shards, **kw)
    all_batches(straight, 8)
    assert resumed.stats == straight.stats


def _roundtrip(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return decode_image(buf.getvalue())


def test_mode_conversions():
    px = lambda im: np.asarray(im)[0, 0].tolist()  # noqa: E731
    assert _roundtrip(Image.new("L", (4, 4), 77)).mode == "RGB"
    assert px(_roundtrip(Image.new("L", (4, 4), 77))) == [77, 77, 77]
    assert px(_roundtrip(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))) == [255, 255, 255]  # transparent -> white
    assert px(_roundtrip(Image.new("RGBA", (4, 4), (0, 0, 255, 255)))) == [0, 0, 255]
    half = px(_roundtrip(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert all(abs(v - 127) <= 1 for v in half)  # 50% black over white
    assert px(_roundtrip(Image.new("LA", (4, 4), (0, 0)))) == [255, 255, 255]
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert px(_roundtrip(p)) == [10, 200, 30]
    p.info["transparency"] = 1
    assert px(_roundtrip(p)) == [255, 255, 255]
    assert px(_roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "TIFF")) == [255, 255, 255]
    assert px(_roundtrip(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "TIFF")) == [0, 255, 255]
    assert px(_roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 255)), "TIFF")) == [0, 0, 0]
    for value, want in [(65535, 255), (32896, 128), (0, 0)]:
        im16 = Image.fromarray(np.full((4, 4), value, dtype=np.uint16))
        assert im16.mode.startswith("I")
        assert px(_roundtrip(im16)) == [want] * 3


def test_resize_shorter_side_and_center_crop():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # a white centre band, 40 wide on an 80-wide image
    x = image_transform(16)(Image.fromarray(arr))
    assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert x[:, :, 2:14].min() > 0.95  # the crop sees only the white centre
    y = image_transform(16, mean=[0.5] * 3, std=[0.5] * 3)(Image.fromarray(arr))
    assert torch.allclose(y, x * 2 - 1, atol=1e-6)


def test_csv_and_folder_loaders(tmp_path):
    for cls, color in [("red_thing", (220, 0, 0)), ("blue_thing", (0, 0, 220))]:
        os.makedirs(tmp_path / "folder" / cls)
        for i in range(3):
            Image.new("RGB", (20, 30), color).save(tmp_path / "folder" / cls / f"{i}.png")
    folder = image_folder_loader(str(tmp_path / "folder"), image_transform(16), tokenize, 4, drop_last=False)
    assert folder.classnames == ["blue_thing", "red_thing"]
    batches = all_batches(folder)
    labels = torch.cat([b["labels"] for b in batches])
    images = torch.cat([b["images"] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert torch.all((images[:, 0].mean((1, 2)) > 0.5) == (labels == 1))  # red images are the red class
    assert "a photo of a red thing" in [t for b in batches for t in b["texts"]]

    rows = ["filepath,title"] + [f"folder/red_thing/{i}.png,a red one {i}" for i in range(3)] + ["missing.png,gone"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    loader = csv_loader(str(tmp_path / "pairs.csv"), image_transform(16), tokenize, 2, drop_last=False)
    batches = all_batches(loader)
    assert sorted(t for b in batches for t in b["texts"]) == ["a red one 0", "a red one 1", "a red one 2"]
    assert "labels" not in batches[0] and loader.stats["decode_errors"] == 1 and loader.stats["skipped"] == 1
    # cache_mb works for file lists too (PairLoader's decoded-image cache): the same images, files read once
    cached = csv_loader(str(tmp_path / "pairs.csv"), image_transform(16), tokenize, 2, drop_last=False, cache_mb=1)
    seen = {t: x for b in all_batches(cached) for t, x in zip(b["texts"], b["images"])}
    assert len(cached._stream._decoded) == 3
    os.rename(tmp_path / "folder", tmp_path / "moved")
    again = {t: x for b in all_batches(cached) for t, x in zip(b["texts"], b["images"])}  # the next epoch
    assert sorted(again) == sorted(seen) == ["a red one 0", "a red one 1", "a red one 2"]
    assert all(torch.equal(again[t], seen[t]) for t in seen)
    assert cached.stats["decode_errors"] == 2  # the missing file in each epoch; the moved ones came from memory


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="no such shard"):
        expand_shards(str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(DataError, match="not a directory"):
        image_folder_loader(str(tmp_path / "nope"), image_transform(16))


def test_hard_negative_captions_batched(shards):
    """Shards whose samples carry {key}.neg.txt give neg_texts / neg_tokens aligned with the batch;
    shards without them (held-out) give neither."""
    from qlip.data.shapes import make_sample
    tf = image_transform(32)
    b = next(iter(webdataset_loader(shards["train_shards"], tf, tokenize, batch_size=6, shuffle=False)))
    assert b["neg_tokens"].shape == b["tokens"].shape == (6, 77)
    for key, text, neg in zip(b["keys"], b["texts"], b["neg_texts"]):
        _, cap, meta = make_sample(int(key), size=32, seed=0)
        assert (text, neg) == (cap, meta["negative_caption"])
    torch.testing.assert_close(b["neg_tokens"], tokenize(b["neg_texts"]))
    held = next(iter(webdataset_loader(shards["heldout_shards"], tf, tokenize, batch_size=4, label_key="cls")))
    assert "neg_tokens" not in held and "neg_texts" not in held


def test_cache_gives_the_same_batches_and_serves_later_epochs_from_memory(shards, tmp_path):
    """cache_mb: decoded images and the shards' raw samples kept after the first epoch; the batches
    are the ones without it, and the second epoch needs no file (the shards moved away)."""
    import shutil
    local = []
    for p in shards["train_shards"]:
        local.append(str(tmp_path / os.path.basename(p)))
        shutil.copy(p, local[-1])
    kw = dict(transform=image_transform(32), tokenizer=tokenize, batch_size=6, seed=2, infinite=True,
              shuffle_buffer=10)
    ref = all_batches(webdataset_loader(local, **kw), 14)          # 84 samples: two epochs of 42
    cached = webdataset_loader(local, cache_mb=1, **kw)
    it = iter(cached)
    got = [next(it) for _ in range(7)]                              # the first epoch: every shard read
    assert len(cached._stream._decoded) == 42 and len(cached.source._cache) == 4
    for p in local:
        os.rename(p, p + ".moved")
    got += [next(it) for _ in range(7)]
    for a, b in zip(ref, got):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    for b in got:  # a batch never shares memory with the cache
        assert all(b["images"].data_ptr() != x.data_ptr() for x in cached._stream._decoded.values())


def test_cache_keeps_within_its_budget_and_skips_truncated_shards(corrupt_shards, shards):
    kw = dict(transform=image_transform(32), tokenizer=tokenize, batch_size=6, drop_last=False)
    tiny = webdataset_loader(shards["train_shards"], cache_mb=0, **kw)
    all_batches(tiny)
    assert not tiny._stream._decoded and not tiny.source._cache
    one_mb = webdataset_loader(shards["train_shards"], cache_mb=1, **kw)  # 42 x 12 KB fit
    all_batches(one_mb)
    assert one_mb._stream._decoded_bytes <= 1 << 20 and len(one_mb._stream._decoded) == 42
    broken = webdataset_loader(corrupt_shards, image_transform(16), tokenize, 3, drop_last=False, split="sample",
                               cache_mb=1)
    all_batches(broken)
    # a.tar was read to its end (its bad samples are skipped each time); b.tar is truncated: never cached
    assert sorted(os.path.basename(u) for u in broken.source._cache) == ["a.tar"]
    with pytest.raises(DataError, match="cache_mb"):
        webdataset_loader(shards["train_shards"], cache_mb=-1, **kw)
