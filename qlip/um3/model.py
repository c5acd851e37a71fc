"""The UM3 model: a Llama-3 decoder with QK-norm and a vocabulary extended with visual rows.

Built on :class:`qlip.nn.CausalTransformer` (docs/um3.md says why, not on transformers' Qwen3
classes). :func:`from_llama` starts it from any Hugging Face ``LlamaForCausalLM`` folder
(``config.json`` + ``model.safetensors`` or sharded safetensors + ``tokenizer.json``):

1. the Llama config and weights map one to one (:mod:`qlip.nn.hf_llama`);
2. QK-norm is switched on (an RMSNorm over each head's queries and one over its keys, before
   RoPE); its weights start at 1, the only parameters the checkpoint lacks;
3. tied embeddings are untied (the output layer becomes a copy of the embedding);
4. the embedding and the output layer get ``<boi>``, ``<eoi>`` and the visual rows
   (:class:`qlip.um3.vocab.UM3Vocab`), each new row the mean of that matrix's text rows (paper
   Sec. 4.1: ``e_i = sum_j e_j / V_t`` for ``i > V_t``); ``visual_init="bits"`` (ours, opt-in)
   adds to each visual row a fixed random projection of its sub-token's bits
   (:func:`bits_extend`), so that rows sharing bits start close and a row never seen in training
   is not the text mean: a small model learns from few images what the paper's scale learns
   from billions (docs/um3.md);
5. ``visual_bits=True`` (ours, opt-in; :class:`VisualBits`): a learned projection of each visual
   row's bits is added to that row of the embedding and of the output layer, zero at the start.
   Every image then trains what its bits mean for all rows that share them, not only its own rows.
   Saved models fold it into the two matrices (:func:`fold_visual_bits`): a plain UM3 / Llama.
6. ``layout="token"`` (ours, opt-in; :mod:`qlip.um3.vocab`): one sequence position per QLIP token.
   The position reads the sum of its sub-tokens' embedding rows; the sub-tokens are predicted one
   after another from its final state by :class:`qlip.nn.IntraChain` (``chain.*``: small
   MLPs and one embedding table per earlier sub-token), each over its group's rows of the output
   layer. The text rows and the visual rows are the paper's; the chain is the only addition, so
   this model is no longer a plain Llama (:func:`qlip.um3.hf_export.export_hf` refuses it).

Saved as ``config.json`` (``{"architecture": "um3", "lm": CausalLMConfig, "vocab": UM3Vocab,
"bos_id", "eos_id"}``) + ``model.safetensors`` (the ``qlip.nn`` names) + ``tokenizer.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..io import read_json
from ..nn import CausalLMConfig, CausalTransformer, IntraChain, causal_lm_config_from_hf, state_dict_from_hf
from ..quant.bsq import group_ids_to_ids, ids_to_group_ids
from .text import TextTokenizer
from .vocab import UM3Vocab

ARCHITECTURE = "um3"


def bit_signs(group_bits: int) -> torch.Tensor:
    """``(2**group_bits, group_bits)`` float64: the bits of every sub-token value as -1 / +1
    (column k is bit k, least significant first)."""
    values = torch.arange(1 << group_bits, dtype=torch.int64)
    return ((values[:, None] >> torch.arange(group_bits)) & 1).double() * 2 - 1


class VisualBits(nn.Module):
    """Learned per-bit vectors added to the visual rows (``model.visual_bits``; ours, opt-in).

    Visual row ``v`` of group ``g`` (sub-token value ``v``, bits ``s(v)`` as +-1, :func:`bit_signs`)
    is used as ``E[row] + s(v) A_g / k`` in the embedding and ``W[row] + s(v) B_g / k`` in the output
    layer, ``k = group_bits``; ``A``, ``B`` ``(groups, group_bits, dim)`` start at zero, so the model
    starts exactly as without them. The ``1 / k`` keeps an optimizer step on ``A`` from moving a
    row ``k`` times as far as a step on the row itself (Adam moves every element by about the
    learning rate: without it the visual rows outgrew the text rows within 200 steps). A row is
    seen a few times in a small run, each bit in every image: what the bits mean for captioning
    and drawing is learned from all of them (the embedding-side counterpart of the bitwise heads of
    Infinity). The same function as 2 x 16,384 free rows, reparametrised; folded into the rows for
    saving (:func:`fold_visual_bits`)."""

    def __init__(self, vocab: UM3Vocab, dim: int):
        super().__init__()
        vv = vocab.visual
        self.start, self.groups, self.group_bits = vocab.visual_start, vv.groups, vv.group_bits
        self.inp = nn.Parameter(torch.zeros(vv.groups, vv.group_bits, dim))
        self.out = nn.Parameter(torch.zeros(vv.groups, vv.group_bits, dim))
        # +-1 bits of every sub-token value, made once (not saved: a function of group_bits)
        self.register_buffer("signs", bit_signs(vv.group_bits).float(), persistent=False)

    def rows(self, proj: torch.Tensor) -> torch.Tensor:
        """``(groups * group_size, dim)``: ``s(v) proj_g / k`` for every visual row, in row order."""
        signs = self.signs.to(device=proj.device, dtype=proj.dtype)
        return torch.cat([signs @ proj[g] for g in range(self.groups)], 0) / self.group_bits

    def embed(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``emb`` ``(B, T, dim)`` (the rows of ``tokens``) plus the visual part of each visual token's row."""
        rel = tokens.long() - self.start
        extra = F.embedding(rel.clamp(min=0), self.rows(self.inp).to(emb.dtype))
        return emb + extra * (rel >= 0)[..., None].to(emb.dtype)

    def output_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The output layer's ``weight`` ``(V, dim)`` with ``s(v) B_g / k`` added to its visual rows."""
        vis = weight[self.start:] + self.rows(self.out).to(weight.dtype)
        return torch.cat([weight[: self.start], vis], 0)


def fold_visual_bits(state_dict: Dict[str, torch.Tensor], vocab: UM3Vocab) -> Dict[str, torch.Tensor]:
    """A UM3 state dict with ``visual_bits.inp`` / ``.out`` folded into ``lm.tok_embeddings.weight`` and
    ``lm.output.weight`` (and removed): the same function as a plain UM3 (tested). Unchanged without them."""
    if "visual_bits.inp" not in state_dict:
        return dict(state_dict)
    sd = dict(state_dict)
    inp, out = sd.pop("visual_bits.inp"), sd.pop("visual_bits.out")
    vb = VisualBits(vocab, inp.shape[-1])
    with torch.no_grad():
        for key, proj in (("lm.tok_embeddings.weight", inp), ("lm.output.weight", out)):
            w = sd[key].clone()
            w[vb.start:] += vb.rows(proj.double()).to(w.dtype)
            sd[key] = w
    return sd


class UM3(nn.Module):
    """``lm`` (a :class:`CausalTransformer` over ``vocab.size`` rows) + the vocabulary layout
    (+ :class:`VisualBits` with ``visual_bits``, + :class:`IntraChain` in the ``token`` layout)."""

    def __init__(self, cfg: CausalLMConfig, vocab: UM3Vocab, bos_id: int, eos_id: int, visual_bits: bool = False):
        super().__init__()
        if cfg.vocab_size != vocab.size:
            raise CheckpointError(f"UM3: the model has {cfg.vocab_size} rows, the vocabulary {vocab.size}")
        self.lm = CausalTransformer(cfg)
        self.vocab, self.bos_id, self.eos_id = vocab, int(bos_id), int(eos_id)
        self.visual_bits = VisualBits(vocab, cfg.dim) if visual_bits else None
        vv = vocab.visual
        self.chain = IntraChain(cfg.dim, vv.groups, vv.group_size) if vocab.layout == "token" else None

    @property
    def cfg(self) -> CausalLMConfig:
        return self.lm.cfg

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows of ``rows`` (any shape), with the visual bits' part."""
        e = self.lm.tok_embeddings(rows)
        return e if self.visual_bits is None else self.visual_bits.embed(e, rows)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(B, T, dim)`` of sequence entries ``tokens``: one row each, or in the
        ``token`` layout, for an image token ``visual_start + id``, the sum of its sub-tokens' rows."""
        if self.chain is None:
            return self._rows(tokens)
        v = self.vocab
        vv = v.visual
        vis = tokens >= v.visual_start
        sub = ids_to_group_ids((tokens - v.visual_start).clamp(min=0), vv.bits, vv.group_bits)  # (B, T, G)
        rows = sub + v.visual_start + torch.arange(vv.groups, device=tokens.device) * vv.group_size
        e = self._rows(torch.where(vis, rows[..., 0], tokens))
        if vv.groups > 1:
            e = e + (self._rows(rows[..., 1:]).sum(-2) * vis[..., None].to(e.dtype))
        return e

    def hidden(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """The final hidden states ``(B, T, dim)`` of ``tokens`` (:meth:`CausalTransformer.forward_hidden`)."""
        if self.visual_bits is None and self.chain is None:
            return self.lm.forward_hidden(tokens, **kw)
        return self.lm.forward_hidden(embeds=self.embed(tokens), **kw)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight ``(vocab.size, dim)`` (with the visual bits' part)."""
        w = self.lm.output.weight
        return w if self.visual_bits is None else self.visual_bits.output_weight(w)

    def forward(self, tokens: torch.Tensor, **kw):
        """Logits over all rows ``(B, T, vocab.size)`` (the arguments of :meth:`CausalTransformer.forward_hidden`)."""
        return F.linear(self.hidden(tokens, **kw), self.output_weight())

    def nll(self, tokens: torch.Tensor, targets: torch.Tensor, softmax: str = "split") -> torch.Tensor:
        """Per-position negative log-likelihoods ``(B, T)`` of ``targets`` (``IGNORE``: 0) after
        ``tokens`` ``(B, T)``, under Eq. 6's split softmax or the joint one; logits are computed only
        at target positions (:func:`qlip.um3.loss.head_nll`)."""
        from .loss import head_nll, token_layout_nll
        if self.chain is not None:  # the token layout: image tokens through the chain
            return token_layout_nll(self.hidden(tokens), self.output_weight(), targets, self.vocab, self.chain, softmax)
        return head_nll(self.hidden(tokens), self.output_weight(), targets, self.vocab.visual_start, softmax)

    def next_hidden(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """The final hidden state ``(B, dim)`` of the last position (generation)."""
        return self.hidden(tokens, **kw)[:, -1]

    def next_logits(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Logits ``(B, vocab.size)`` of the last position only (generation: the head on one position)."""
        return F.linear(self.next_hidden(tokens, **kw), self.output_weight())

    def sample_image_tokens(self, h_cond: torch.Tensor, h_uncond: Optional[torch.Tensor] = None, cfg: float = 1.0,
                            temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``token`` layout: QLIP ids ``(B,)`` drawn from the last hidden states ``h_cond`` ``(B, dim)``,
        sub-token by sub-token over each group's output rows, each guided against ``h_uncond``."""
        if self.chain is None:
            raise CheckpointError("sample_image_tokens needs the token layout (model.layout: token)")
        vv = self.vocab.visual
        w = self.output_weight()

        def logits(k: int, x: torch.Tensor) -> torch.Tensor:
            lo = vv.group_start(k)
            return (w[lo:lo + vv.group_size] @ x.to(w.dtype).T).T.float()  # few rows: W @ h^T (heads.py)

        sub = self.chain.sample(logits, h_cond, h_uncond, cfg, temperature, top_k, top_p, generator)
        return group_ids_to_ids(sub, vv.group_bits)

    def folded_state_dict(self, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The state dict of the plain UM3 computing the same function (:func:`fold_visual_bits`)."""
        return fold_visual_bits(self.state_dict() if state_dict is None else state_dict, self.vocab)

    def make_cache(self, batch: int, max_len: Optional[int] = None):
        return self.lm.make_cache(batch, max_len)

    def fsdp_units(self) -> List[Tuple[str, nn.Module]]:
        return [(f"lm.{name}", m) for name, m in self.lm.fsdp_units()]

    def meta(self) -> Dict[str, Any]:
        return {"architecture": ARCHITECTURE, "lm": dataclasses.asdict(self.cfg), "vocab": self.vocab.to_dict(),
                "bos_id": self.bos_id, "eos_id": self.eos_id}


# ---- starting from a Llama ---------------------------------------------------------------------
def mean_extend(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` ``(V_t, d)`` with ``rows`` new rows appended, each the mean of the ``V_t`` rows
    (computed in float64, stored in the weight's dtype)."""
    mean = weight.double().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)], 0)


VISUAL_INITS = ("mean", "bits")


def bits_extend(weight: torch.Tensor, vocab: UM3Vocab, seed: int = 0) -> torch.Tensor:
    """:func:`mean_extend`, then visual row ``v`` of group ``g`` plus ``sigma * R_g s(v)``:
    ``s(v)`` the sub-token's bits as +-1 (:func:`bit_signs`), ``R_g`` a fixed ``(group_bits, d)``
    Gaussian matrix with variance ``1 / group_bits`` (seeded: the same rows every time), ``sigma``
    the standard deviation of the text rows' elements, so the added part has the text rows' scale.
    ``<boi>`` / ``<eoi>`` stay the mean."""
    out = mean_extend(weight, vocab.added)
    vv = vocab.visual
    sigma = float(weight[: vocab.text_size].double().std())
    signs = bit_signs(vv.group_bits)
    gen = torch.Generator().manual_seed(seed)
    for g in range(vv.groups):
        proj = torch.randn(vv.group_bits, weight.shape[1], generator=gen, dtype=torch.float64) / math.sqrt(vv.group_bits)
        start = vv.group_start(g)
        out[start:start + vv.group_size] += (sigma * signs @ proj).to(out.dtype)
    return out


def read_hf_weights(folder: str) -> Dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors: ``model.safetensors`` or the shards named in
    ``model.safetensors.index.json``."""
    from safetensors.torch import load_file
    single = os.path.join(folder, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: Dict[str, torch.Tensor] = {}
        for name in files:
            out.update(load_file(os.path.join(folder, name)))
        return out
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(a Hugging Face LlamaForCausalLM folder is expected)")


def from_llama(folder: str, bits: int = 28, groups: int = 2, qk_norm: bool = True,
               max_seq_len: Optional[int] = None, visual_init: str = "mean",
               visual_bits: bool = False, layout: str = "subtoken") -> Tuple[UM3, TextTokenizer]:
    """A UM3 model (float32) and its text tokenizer from a Hugging Face Llama (or Qwen3) folder;
    ``visual_init``: ``mean`` (the paper) or ``bits`` (:func:`bits_extend`); ``visual_bits``: add
    the learned :class:`VisualBits` (zero at the start); ``layout``: ``subtoken`` (the paper) or
    ``token`` (:mod:`qlip.um3.vocab`; its chain starts at PyTorch's default init, from the
    caller's random state: the engine seeds it)."""
    if visual_init not in VISUAL_INITS:
        raise CheckpointError(f"visual_init must be one of {', '.join(VISUAL_INITS)}, got {visual_init!r}")
    hf = read_json(os.path.join(folder, "config.json"))
    src_cfg = causal_lm_config_from_hf(hf)
    sd = state_dict_from_hf({k: v.float() for k, v in read_hf_weights(folder).items()}, src_cfg)
    vocab = UM3Vocab(text_size=src_cfg.vocab_size, bits=bits, groups=groups, layout=layout)
    extra = {} if max_seq_len is None else {"max_seq_len": max_seq_len}
    cfg = causal_lm_config_from_hf(hf, vocab_size=vocab.size, tie_embeddings=False,
                                   qk_norm=qk_norm or src_cfg.qk_norm, **extra)
    for key in ("tok_embeddings.weight", "output.weight"):
        if key not in sd:
            raise CheckpointError(f"{folder}: the checkpoint has no {key} (Hugging Face name of "
                                  f"{'model.embed_tokens' if key.startswith('tok') else 'lm_head'})")
        w = sd[key].clone()  # clone: untie
        sd[key] = bits_extend(w, vocab) if visual_init == "bits" else mean_extend(w, vocab.added)
    tok = TextTokenizer.from_folder(folder, bos_id=_single_id(hf.get("bos_token_id")),
                                    eos_id=_single_id(hf.get("eos_token_id")))
    model = UM3(cfg, vocab, tok.bos_id, tok.eos_id, visual_bits=visual_bits)
    own = model.lm.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if unexpected or any(not k.endswith(("q_norm.weight", "k_norm.weight")) for k in missing):
        raise CheckpointError(f"{folder}: weights do not match the config (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]})")
    for k in missing:  # QK-norm: the identity scale (RMSNorm weights 1)
        sd[k] = torch.ones_like(own[k])
    model.lm.load_state_dict(sd)
    if tok.size > vocab.text_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tok.size} tokens, the embedding {vocab.text_size} rows")
    return model, tok


def _single_id(x) -> Optional[int]:
    if isinstance(x, list):  # Llama 3 instruct lists several EOS ids: the first is the text's end
        return int(x[0]) if x else None
    return None if x is None else int(x)


# ---- our own format ------------------------------------------------------------------------------
def save_um3(model: UM3, tokenizer: TextTokenizer, folder: str,
             state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    from ..io import atomic_write_text, write_safetensors
    os.makedirs(folder, exist_ok=True)  # visual bits folded: a plain UM3 with the same outputs
    write_safetensors(model.folded_state_dict(state_dict), os.path.join(folder, "model.safetensors"))
    tokenizer.save(folder)
    atomic_write_text(os.path.join(folder, "config.json"), json.dumps(model.meta(), indent=2) + "\n")


def load_um3(folder: str, device: Optional[torch.device] = None) -> Tuple[UM3, TextTokenizer]:
    """A model saved by :func:`save_um3` (``qlip um3 train``'s ``OUT/final`` or a checkpoint folder)."""
    from ..io import load_state_dict_strict, read_state_dict
    meta = read_json(os.path.join(folder, "config.json"))
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{folder}: not a UM3 model (architecture {meta.get('architecture')!r}); "
                              "a Hugging Face Llama folder is a starting point for training (model.init)")
    model = UM3(CausalLMConfig.from_dict(meta["lm"]), UM3Vocab.from_dict(meta["vocab"]), meta["bos_id"], meta["eos_id"])
    load_state_dict_strict(model, read_state_dict(folder), folder)
    tok = TextTokenizer.from_folder(folder, bos_id=meta["bos_id"], eos_id=meta["eos_id"])
    model.eval()
    return (model.to(device) if device is not None else model), tok
