"""Question answering on the synthetic shapes: LLaVA-format data for VLM tests and the demo.

Built on :func:`qlip.data.shapes.make_sample` (every image a pure function of seed, split and
index). Questions with one-word answers:

=============  =============================  ==========================================
type           question (verbatim)            answers
=============  =============================  ==========================================
``colour``     What color is the shape?       the colour name (red, green, blue, ...)
``kind``       What kind of shape is it?      circle, square, triangle, star
``position``   Where is the shape?            left, right, top, bottom, center
``size``       How big is the shape?          small, large
``count``      How many shapes are there?     one, two, three
=============  =============================  ==========================================

The first four are asked about single-shape images (the held-out split has only those; about
half of the training split), ``count`` about every image. :func:`write_shapes_qa` writes
``OUT/{split}.json`` (LLaVA's JSON: ``image``, ``conversations``; plus ``qa``, the
``[{"type", "question", "answer"}]`` list for scoring) and the PNGs under ``OUT/images/``.
``multi_turn=True`` asks all of an image's questions in one conversation (a shuffled order);
otherwise each question is its own record. ``multi_shape_fraction`` caps the share of
multi-shape images (count questions only) among the ``n`` written: skipped multi-shape samples
make room for single-shape ones, which carry the four other questions (the VLM demo's recipe,
docs/vlm.md "Issue 16, third round").
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from ..errors import DataError
from .shapes import make_sample

QUESTIONS: Dict[str, str] = {
    "colour": "What color is the shape?",
    "kind": "What kind of shape is it?",
    "position": "Where is the shape?",
    "size": "How big is the shape?",
    "count": "How many shapes are there?",
}
SINGLE_SHAPE_TYPES = ("colour", "kind", "position", "size")
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def qa_pairs(meta: dict, types: Optional[List[str]] = None) -> List[Dict[str, str]]:
    """``[{"type", "question", "answer"}]`` for a sample's metadata (``make_sample``'s third value)."""
    shapes = meta["shapes"]
    want = list(types) if types is not None else list(QUESTIONS)
    bad = [t for t in want if t not in QUESTIONS]
    if bad:
        raise DataError(f"unknown question types {bad} (known: {', '.join(QUESTIONS)})")
    out = []
    for t in want:
        if t == "count":
            answer = _COUNT_WORDS[len(shapes)]
        elif len(shapes) == 1:
            s = shapes[0]
            answer = {"colour": s["color"], "kind": s["kind"], "position": s["position"], "size": s["size"]}[t]
        else:
            continue
        out.append({"type": t, "question": QUESTIONS[t], "answer": answer})
    return out


def write_shapes_qa(out_dir: str, n: int, split: str = "train", size: int = 64, seed: int = 0,
                    multi_turn: bool = False, types: Optional[List[str]] = None,
                    multi_shape_fraction: Optional[float] = None) -> str:
    """Write ``n`` images of ``split`` and their questions; returns the JSON path.

    ``multi_shape_fraction`` (0..1, default: the generator's own mix, about half): a multi-shape
    sample is written only while the multi-shape images stay within this fraction of the images
    written; the others are skipped (image files keep their sample index)."""
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    if multi_shape_fraction is not None and not 0.0 <= multi_shape_fraction <= 1.0:
        raise DataError(f"multi_shape_fraction must be in [0, 1], got {multi_shape_fraction}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    written = multi = 0
    i = -1
    while written < n:
        i += 1
        img, _, meta = make_sample(i, size=size, seed=seed, split=split)
        several = len(meta["shapes"]) > 1
        if several and multi_shape_fraction is not None and multi + 1 > multi_shape_fraction * (written + 1):
            continue
        written, multi = written + 1, multi + int(several)
        rel = f"images/{split}-{i:06d}.png"
        img.save(os.path.join(out_dir, rel))
        qa = qa_pairs(meta, types)
        if not qa:
            continue
        if multi_turn:
            order = np.random.default_rng([seed, i, 7919]).permutation(len(qa)).tolist()
            qa = [qa[j] for j in order]
            groups = [qa]
        else:
            groups = [[q] for q in qa]
        for g in groups:
            conv = []
            for k, q in enumerate(g):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q["question"]})
                conv.append({"from": "gpt", "value": q["answer"]})
            rid = f"{split}-{i:06d}" + ("" if multi_turn else f"-{g[0]['type']}")
            records.append({"id": rid, "image": rel, "conversations": conv, "qa": g})
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return path
