"""Text-to-image generation on QLIP tokens (LlamaGen-style; the paper's Section 5.4 / Table 7).

A decoder-only transformer (``qlip.nn`` blocks, 2-D RoPE over the image grid) reads a caption
prefix (a frozen text encoder's features through an MLP) and predicts the image's 28-bit token
ids in raster order through a visual head (``split`` 2 x 14-bit, ``bitwise``, ``intra``).
Train with ``qlip gen train RECIPE --out DIR`` (task ``t2i`` of the training engine), sample
with ``qlip gen sample --model DIR --prompt ...`` or ``qlip.gen.load(DIR).generate(...)``.
See docs/gen.md.
"""
from ..train import register_task
from .generator import Generator, load
from .heads import BitwiseHead, IntraTokenHead, SplitHead, make_head
from .model import PRESETS, GenConfig, T2IModel

register_task("t2i", "qlip.gen.task:T2ITask")

__all__ = ["Generator", "load", "GenConfig", "T2IModel", "PRESETS", "make_head", "SplitHead", "BitwiseHead",
           "IntraTokenHead"]
