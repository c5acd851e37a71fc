"""Boolean attention masks for ``torch.nn.functional.scaled_dot_product_attention``.

Convention: ``True`` = the query may attend to the key (SDPA's boolean ``attn_mask``). A mask is
``(Tq, Tk)`` when it is the same for the whole batch, ``(B, 1, Tq, Tk)`` otherwise (the ``1``
broadcasts over heads).

Queries are always the *last* ``Tq`` positions of the ``Tk`` keys: with a KV cache, queries sit at
absolute positions ``[start, start + Tq)`` and keys at ``[0, start + Tq)``, so ``start = Tk - Tq``
(``0`` without a cache).

Padding: ``key_valid`` is a ``(B, Tk)`` boolean tensor, ``False`` at pad tokens (left or right
padding, or holes). Real queries never attend to pads. A query whose row would be empty (a pad
query in a left-padded row sees only pads) attends to its own position instead: an all-``False``
row makes SDPA return NaN, and a NaN value, even multiplied by a zero weight, would leak into the
real tokens of the next layer. The outputs at pad positions are meaningless; ignore them.
"""
from __future__ import annotations

from typing import Optional, Union

import torch


def causal_mask(q_len: int, start: int = 0, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(q_len, start + q_len)``: query ``i`` (absolute position ``start + i``) sees keys
    ``0 .. start + i``. With ``start > 0`` this is the mask for decoding with a KV cache (a
    prefill of ``q_len`` tokens after ``start`` cached ones, or ``q_len = 1`` for one step)."""
    q_pos = torch.arange(start, start + q_len, device=device)
    k_pos = torch.arange(start + q_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def decode_mask(start: int, q_len: int, key_valid: Optional[torch.Tensor] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Mask for ``q_len`` new queries after ``start`` cached tokens, keys ``[0, start + q_len)``.
    Without ``key_valid`` it is :func:`causal_mask`; with a ``(B, start + q_len)`` ``key_valid``
    (the padding of the prompt plus ``True`` for the new tokens) it is :func:`with_key_padding`
    of it, ``(B, 1, q_len, start + q_len)``."""
    device = key_valid.device if key_valid is not None else device
    mask = causal_mask(q_len, start, device=device)
    return mask if key_valid is None else with_key_padding(mask, key_valid)


def with_key_padding(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Combine a ``(Tq, Tk)`` or ``(B, 1, Tq, Tk)`` mask with ``key_valid`` ``(B, Tk)``:
    ``(B, 1, Tq, Tk)``. Rows left empty attend to their own position (see the module doc)."""
    if key_valid.dim() != 2 or key_valid.shape[-1] != mask.shape[-1]:
        raise ValueError(f"key_valid must be (batch, {mask.shape[-1]}) to match the mask's keys, "
                         f"got {tuple(key_valid.shape)}")
    if mask.dim() == 2:
        mask = mask[None, None]
    out = mask & key_valid.bool()[:, None, None, :]
    q_len, k_len = out.shape[-2:]
    own = _diagonal(q_len, k_len, out.device)
    empty = ~out.any(dim=-1, keepdim=True)
    return out | (empty & own)


def _diagonal(q_len: int, k_len: int, device) -> torch.Tensor:
    """``(q_len, k_len)``, ``True`` where the key is the query's own position (``start + i``)."""
    start = k_len - q_len
    return torch.arange(k_len, device=device)[None, :] == torch.arange(start, k_len, device=device)[:, None]


def causal_padding_mask(key_valid: torch.Tensor, q_len: Optional[int] = None) -> torch.Tensor:
    """Causal mask for a padded batch, ``(B, 1, Tq, Tk)`` with ``Tk = key_valid.shape[1]`` and
    ``Tq = q_len or Tk`` (the last ``Tq`` positions query)."""
    k_len = key_valid.shape[-1]
    q_len = k_len if q_len is None else q_len
    return with_key_padding(causal_mask(q_len, k_len - q_len, device=key_valid.device), key_valid)


def prefix_lm_mask(seq_len: int, prefix_len: Union[int, torch.Tensor], start: int = 0,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Prefix-LM mask: the first ``prefix_len`` positions see each other bidirectionally, later
    positions are causal (and see the whole prefix). ``seq_len`` queries at positions
    ``[start, start + seq_len)`` against keys ``[0, start + seq_len)``. An int ``prefix_len``
    gives ``(Tq, Tk)``; a ``(B,)`` tensor (one prefix per row) gives ``(B, 1, Tq, Tk)``."""
    if torch.is_tensor(prefix_len):
        device = prefix_len.device
    causal = causal_mask(seq_len, start, device=device)
    k_pos = torch.arange(start + seq_len, device=device)
    q_pos = torch.arange(start, start + seq_len, device=device)
    if torch.is_tensor(prefix_len):
        p = prefix_len.view(-1, 1, 1, 1)
        in_prefix = (k_pos[None, None, None, :] < p) & (q_pos[None, None, :, None] < p)
        return causal[None, None] | in_prefix
    in_prefix = (k_pos[None, :] < prefix_len) & (q_pos[:, None] < prefix_len)
    return causal | in_prefix


def padded_positions(key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` position ids that count only real tokens (``cumsum - 1``, pads clamped to 0), so
    a left-padded row gets the same positions as the unpadded sequence."""
    return (key_valid.long().cumsum(-1) - 1).clamp_min(0)
