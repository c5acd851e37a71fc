"""How much does a UM3 model's drawing use the caption, and its colour word? (issue 12)

For the first ``--n`` pairs of a token-shard folder, the drawing row ``<bos> caption <boi> image
<eoi>`` is scored with its caption, with no caption and with the colour words swapped
(:mod:`qlip.um3.scoring`); the gains are nats per image, without the sampling noise of judged
drawings. Prints one JSON line::

    python benchmarks/um3_colour_gain.py --model runs/demo-um3/um3 --tokens runs/demo-um3/data/tokens
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def colour_gain(model_dir: str, tokens: str, n: int = 32, seed: int = 0) -> dict:
    from qlip.data.tokens import TokenShardDataset
    from qlip.um3.model import load_um3
    from qlip.um3.scoring import caption_gains
    model, tok = load_um3(model_dir)
    model.eval()
    data = TokenShardDataset(tokens)
    n = min(n, len(data))
    caps = [str(data.captions[i]) for i in range(n)]
    ids = torch.stack([torch.from_numpy(np.array(data.ids[i], dtype=np.int64)) for i in range(n)])
    return {"model": model_dir, "images": n, **caption_gains(model, tok, caps, ids, seed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a saved UM3 folder (qlip demo um3's OUT/um3, a run's final/)")
    p.add_argument("--tokens", required=True, help="token shards with captions (qlip data tokenize)")
    p.add_argument("--n", type=int, default=32, help="pairs scored (the first ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the colour swaps")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(colour_gain(a.model, a.tokens, a.n, a.seed)))


if __name__ == "__main__":
    main()
