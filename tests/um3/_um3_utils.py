"""Shared tiny fixtures of the UM3 tests: a tiny random Llama folder, fake QLIP token shards and a
text corpus (no download, no QLIP run)."""
import json
import os
import random

import numpy as np

BITS, GROUPS, GRID = 8, 2, (2, 2)   # 2 x 16 visual rows, 4 QLIP tokens = 8 sub-tokens per image
COLOURS = ["red", "green", "blue", "yellow"]
KINDS = ["circle", "square"]


def tiny_llama(folder, **kw):
    from qlip.um3.tiny import make_tiny_llama
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=256)
    args.update(kw)
    return make_tiny_llama(str(folder), **args)


def image_ids(colour: int, kind: int, n: int = 4) -> np.ndarray:
    """A 'picture' of 8-bit ids that depends on colour and kind (learnable, exact)."""
    return np.array([(colour * 37 + kind * 101 + 13 * k) % (1 << BITS) for k in range(n)], dtype=np.int32)


def write_token_shards(folder, count: int = 32, seed: int = 0):
    from qlip.data import tokens as T
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows, caps = [], []
    for _ in range(count):
        c, k = rng.randrange(len(COLOURS)), rng.randrange(len(KINDS))
        rows.append(image_ids(c, k, GRID[0] * GRID[1]))
        caps.append(f"a {COLOURS[c]} {KINDS[k]}")
    cfg = {"format": T.FORMAT, "version": T.FORMAT_VERSION, "model": {"name": "fake"}, "bits": BITS,
           "grid": list(GRID), "dtype": "int32", "preprocess": {}, "sources": ["fake-000"], "fingerprint": "fake"}
    with open(os.path.join(folder, T.CONFIG), "w") as f:
        json.dump(cfg, f)
    T.write_part(str(folder), 0, cfg, np.stack(rows), [str(i) for i in range(count)], caps, {})
    T.build_index(str(folder))
    return str(folder)


def write_corpus(path, lines: int = 300, seed: int = 0):
    rng = random.Random(seed)
    words = "the a red blue green circle square is left of right above below and".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + "."
                              for _ in range(lines)))
    return str(path)
