"""How much does a UM3 model's drawing use the caption, and its colour word? (issue 12)

For the first ``--n`` single-shape pairs of a token-shard folder, the drawing row
``<bos> caption <boi> image <eoi>`` is scored three ways: with its caption, with no caption (the
unconditional row of classifier-free guidance) and with every colour word of the caption replaced
by another colour (seeded). The gains, in nats per image (summed over the image's sub-tokens and
``<eoi>``), say what the caption and its colour word are worth to the model's image distribution,
without the sampling noise of judged drawings. Prints one JSON line::

    python benchmarks/um3_colour_gain.py --model runs/demo-um3/um3 --tokens runs/demo-um3/data/tokens
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402


def swap_colours(caption: str, rng: random.Random) -> str:
    """The caption with each colour word replaced by a different colour."""
    from qlip.data.shapes import COLOR_NAMES
    return " ".join(rng.choice([c for c in COLOR_NAMES if c != w]) if w in COLOR_NAMES else w
                    for w in caption.split())


def drawing_nll(model, tok, captions, ids) -> torch.Tensor:
    """Per-image NLL (nats) of ``ids`` ``(N, h, w)`` after ``<bos> caption <boi>``, one row at a time
    (captions of different lengths need no padding)."""
    from qlip.um3.loss import IGNORE
    v = model.vocab
    out = []
    with torch.no_grad():
        for cap, x in zip(captions, ids):
            img = [v.boi] + v.image_rows(x[None])[0].tolist() + [v.eoi]
            seq = torch.tensor([[model.bos_id] + (tok.encode(cap) if cap else []) + img])
            labels = seq[:, 1:].clone()
            labels[:, : seq.shape[1] - len(img)] = IGNORE  # targets: the sub-tokens and <eoi>
            out.append(float(model.nll(seq[:, :-1], labels, "split").sum()))
    return torch.tensor(out, dtype=torch.float64)


def colour_gain(model_dir: str, tokens: str, n: int = 32, seed: int = 0) -> dict:
    from qlip.data.tokens import TokenShardDataset
    from qlip.um3.model import load_um3
    model, tok = load_um3(model_dir)
    model.eval()
    data = TokenShardDataset(tokens)
    n = min(n, len(data))
    caps = [str(data.captions[i]) for i in range(n)]
    ids = torch.stack([torch.as_tensor(data.ids[i]).long() for i in range(n)])
    rng = random.Random(seed)
    cond = drawing_nll(model, tok, caps, ids)
    uncond = drawing_nll(model, tok, [""] * n, ids)
    swapped = drawing_nll(model, tok, [swap_colours(c, rng) for c in caps], ids)
    return {"model": model_dir, "images": n, "nll_caption": float(cond.mean()), "nll_no_caption": float(uncond.mean()),
            "nll_colour_swapped": float(swapped.mean()), "caption_gain": float((uncond - cond).mean()),
            "colour_gain": float((swapped - cond).mean())}


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
