"""What the installed torch and transformers can do: the library runs from torch 2.4 on
(``pyproject.toml``), and the few features that came later are switched on here.

* SDPA's ``enable_gqa`` (torch >= 2.5; before it, k/v are repeated: ``qlip.nn.causal_attention``);
* FSDP2 (``fully_shard``) on CPU / gloo ranks (torch >= 2.9: 2.4 and 2.5 need CUDA streams, 2.6 dies
  on ``Stream.record_event``, and on 2.8 (2.7 too, by the same two-rank test) the sharded gradients
  come out as the ranks' sum instead of their mean: 2x with two ranks, plain torch, no qlip code
  (``benchmarks/fsdp_gloo_grads.py``); 2.9 matches one process);
* ``transformers`` >= 5 needs torch >= 2.6 and otherwise disables its PyTorch models;
* ``importlib.metadata.entry_points(group=...)`` is Python >= 3.10 (``requires-python`` is 3.9).
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import QLIPError


def torch_at_least(major: int, minor: int, version: Optional[str] = None) -> bool:
    """``torch.__version__`` (or ``version``) >= ``major.minor``; local tags (``+cu121``) ignored."""
    parts = (version or torch.__version__).split("+")[0].split(".")
    return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)


SDPA_HAS_GQA = torch_at_least(2, 5)      # F.scaled_dot_product_attention(..., enable_gqa=True)
FSDP_ON_CPU = torch_at_least(2, 9)       # fully_shard on gloo ranks that equals one process (see above)


def console_scripts() -> dict:
    """``{name: "module:function"}`` of the installed console scripts, on Python 3.9 (where
    ``entry_points()`` is a dict of groups) and later (``entry_points(group=...)``)."""
    from importlib.metadata import entry_points
    eps = entry_points()
    group = eps.select(group="console_scripts") if hasattr(eps, "select") else eps.get("console_scripts", ())
    return {ep.name: ep.value for ep in group}


def require_transformers_models() -> None:
    """Import ``transformers`` and check that it can build PyTorch models beside this torch, or
    raise a one-line QLIPError (transformers 5 silently turns its models off on torch < 2.6)."""
    try:
        import transformers
        from transformers.utils import is_torch_available
    except ImportError:
        raise QLIPError("this needs transformers: pip install 'qlip[llm]'") from None
    if not is_torch_available():
        raise QLIPError(f"transformers {transformers.__version__} cannot use torch {torch.__version__} (it needs a "
                        f"newer torch): pip install 'transformers<5', or upgrade torch")
