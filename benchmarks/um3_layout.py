"""UM3's two layouts at the demo's size: training step time and drawing speed, measured in one run.

``subtoken`` (the paper's: every sub-token a sequence position) against ``token`` (ours: one
position per QLIP token, the sub-tokens from that position's state; docs/um3.md "Layouts"). The same
tiny random Llama (the demo's size by default: width 64, 2 blocks, 4 heads, 2 KV heads, FFN 256, a
258-row byte vocabulary), the same 28-bit ids as 4 sub-tokens of 7 bits, the same batches of
text-to-image rows (``<bos> caption <boi> image <eoi>``, random ids, an 8 x 8 grid), the split
softmax; AdamW steps (forward, backward, update) and guided drawing with the KV cache (CFG 5,
temperature 1). Prints one JSON line per layout and the ratios ``subtoken / token``::

    OMP_NUM_THREADS=1 python benchmarks/um3_layout.py
    OMP_NUM_THREADS=1 python benchmarks/um3_layout.py --steps 5 --draws 2 --grid 4   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

LAYOUTS = ("subtoken", "token")


def batch_rows(vocab, bos: int, batch: int, caption: int, grid: int, seed: int):
    """(tokens, labels) of ``batch`` text-to-image rows with random caption bytes and random ids."""
    from qlip.um3.loss import IGNORE
    from qlip.um3.mixing import T2I, multimodal_row
    g = torch.Generator().manual_seed(seed)
    rows, firsts = [], []
    for _ in range(batch):
        cap = torch.randint(0, 256, (caption,), generator=g).tolist()
        ids = torch.randint(0, 1 << vocab.bits, (1, grid * grid), generator=g)
        row, first = multimodal_row(T2I, vocab, bos, bos, cap, vocab.image_seq(ids)[0].tolist())
        rows.append(row)
        firsts.append(first)
    seq = torch.tensor(rows)
    labels = seq[:, 1:].clone()
    for i, f in enumerate(firsts):
        labels[i, : f - 1] = IGNORE
    return seq[:, :-1], labels


def measure(layout: str, llama: str, a) -> dict:
    from qlip.um3.generate import Sampling, draw
    from qlip.um3.model import from_llama
    torch.manual_seed(0)
    model, tok = from_llama(llama, bits=28, groups=a.groups, layout=layout, visual_init="bits")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch_rows(model.vocab, model.bos_id, a.batch, a.caption, a.grid, seed=1)
    model.train()

    def step():
        loss = model.nll(x, y, "split").sum() / (y >= 0).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    step_s = (time.perf_counter() - t0) / a.steps
    model.eval()
    caps = ["a red circle"] * a.draws
    draw(model, tok, caps[:1], (a.grid, a.grid), Sampling(seed=0, cfg_scale=5.0))  # warm-up
    t0 = time.perf_counter()
    ids = draw(model, tok, caps, (a.grid, a.grid), Sampling(seed=0, cfg_scale=5.0))
    draw_s = time.perf_counter() - t0
    assert ids.shape == (a.draws, a.grid, a.grid)
    return {"layout": layout, "positions_per_image": a.grid * a.grid * model.vocab.per_token, "seq_len": x.shape[1],
            "step_s": round(step_s, 4), "images_per_s": round(a.draws / draw_s, 2),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--groups", type=int, default=4, help="sub-tokens per 28-bit QLIP token")
    p.add_argument("--grid", type=int, default=8, help="image tokens per side (the demo: 8 x 8)")
    p.add_argument("--caption", type=int, default=8, help="caption tokens per row")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--draws", type=int, default=8, help="images drawn in one batch")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from qlip.um3.tiny import make_tiny_llama
    with tempfile.TemporaryDirectory() as d:
        llama = make_tiny_llama(os.path.join(d, "llama"), dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                                n_kv_heads=a.kv_heads, ffn_hidden=a.ffn, max_seq_len=1024)
        res = {layout: measure(layout, llama, a) for layout in LAYOUTS}
    for r in res.values():
        print(json.dumps(r))
    sub, tok = res["subtoken"], res["token"]
    print(json.dumps({"step_time_ratio_subtoken_over_token": round(sub["step_s"] / tok["step_s"], 2),
                      "drawing_speed_ratio_token_over_subtoken": round(tok["images_per_s"] / sub["images_per_s"], 2),
                      "threads": a.threads, "cpu": _cpu()}))
    return 0


def _cpu() -> str:
    from qlip.nn.precision import cpu_has_amx_bf16, cpu_name
    return (cpu_name() or "unknown") + (" (AMX)" if cpu_has_amx_bf16() else "")


if __name__ == "__main__":
    sys.exit(main())
