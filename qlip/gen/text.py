"""Text conditioning: a frozen text encoder's token features -> MLP -> the caption prefix.

* :class:`TextCondition` (part of the generator, trained): ``Linear -> GELU(tanh) -> Linear`` on
  each token feature (LlamaGen's caption MLP) and the **learned null condition**, a
  ``(text_len, dim)`` parameter that replaces the whole prefix of a dropped caption (10% in
  training by default) and is the unconditional branch of classifier-free guidance. LlamaGen uses
  a fixed random buffer in feature space instead; a learned one in the prefix space costs
  ``text_len * dim`` parameters and needs no feature statistics.
* Frozen encoders (not part of the generator; its folder records which one, see :func:`build_text_encoder`):

  - ``qlip`` (default): QLIP's own text tower (the hidden states after its final LayerNorm, the
    first ``max_len`` of its 77 positions: start token, words, end token, then the causal tower's
    states at the padding, all deterministic). It is aligned with the very image tokens being
    generated. Needs a QLIP checkpoint that still has its text tower (stage 1; stage 2 drops it).
    ``pooled=True`` appends to every token's features the caption's **aligned embedding** (the
    one zero-shot classification compares with image embeddings: ``encode_text``, L2-normalised,
    times ``sqrt(embed_dim)`` so that its entries are of the order of the LayerNorm-ed token
    features'): one vector that already says, in the space the image tokens were trained against,
    what the caption shows (SDXL conditions on a pooled CLIP embedding beside the token features
    for the same reason). Features are then ``width + embed_dim`` wide.
  - ``t5``: a ``transformers`` T5 encoder (FLAN-T5, the paper's choice; ``google/flan-t5-xl`` is
    LlamaGen's), padded / truncated to ``max_len`` tokens, features zeroed at the padding.
    ``t5_config`` builds a random encoder from a ``T5Config`` dict instead (tests, offline), with
    a byte tokenizer (``id = byte + 3``, ByT5's layout; 1 = end, 0 = pad).

  - ``embedding``: no frozen encoder: the caption's CLIP BPE token ids (``qlip.text.Tokenizer``, the
    vocabulary bundled with open_clip, ``max_len`` ids with start and end tokens, zero padded)
    feed a **learned** embedding in the generator (:class:`TextCondition` with ``vocab``), as an
    LLM reads its prompt. Every occurrence of a word has the same input wherever it stands, so
    the generator finds the colour word of "a photo of a red circle" and of "a red circle" alike;
    a frozen causal tower gives the same word different features in different contexts. It is
    not aligned with anything: it learns the words from the captions alone.

Features are float32 ``(B, max_len, width)`` (``embedding``: int64 ``(B, max_len)`` ids);
:class:`TextFeatures` computes them on the fly and keeps up to ``cache_size`` captions' features in
memory (captions repeat a lot in small data).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..compat import require_transformers_models
from ..errors import ConfigError, QLIPError

ENCODERS = ("qlip", "t5", "embedding")


class TextCondition(nn.Module):
    """``(B, L, text_dim)`` features -> ``(B, L, dim)`` prefix; ``drop`` rows get the null condition.

    ``vocab > 0`` (``text.encoder=embedding``): the input is ``(B, L)`` caption token ids instead,
    and the prefix is a learned embedding of each id plus a learned embedding of its position (the
    prefix has no rotary position, so without it the caption would be a bag of words)."""

    def __init__(self, text_dim: int, dim: int, text_len: int, vocab: int = 0):
        super().__init__()
        if vocab:
            self.mlp, self.embed = None, nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.zeros(text_len, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
            self.embed, self.pos = None, None
        self.null = nn.Parameter(torch.zeros(text_len, dim))

    def forward(self, feats: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        if feats.shape[1] != self.null.shape[0]:
            raise QLIPError(f"text features have {feats.shape[1]} tokens, the generator expects {self.null.shape[0]}")
        if self.embed is not None:
            if feats.is_floating_point() or feats.dim() != 2:
                raise QLIPError(f"this generator embeds caption token ids (text.encoder=embedding): expected a "
                                f"(B, {self.null.shape[0]}) integer tensor, got {tuple(feats.shape)} {feats.dtype}")
            p = self.embed(feats.to(self.embed.weight.device)) + self.pos
        else:
            p = self.mlp(feats.to(self.mlp[0].weight.dtype))
        if drop is not None:
            p = torch.where(drop.to(p.device)[:, None, None], self.null.to(p.dtype)[None], p)
        return p


@contextlib.contextmanager
def _seeded(seed: int):
    """Random-init weights from ``seed`` without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_qlip(model: str, random_init: bool = False, seed: int = 0, device="cpu"):
    """A QLIP (preset, folder or hub id) as the other commands load it (``--random-init --seed``)."""
    from ..io import load
    with _seeded(seed):
        try:
            m = load(model, pretrained=False if random_init else None, device=torch.device(device))
        except QLIPError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise QLIPError(f"cannot load QLIP {model!r}: {e.__class__.__name__}: {e}") from None
    return m.eval()


class QLIPTextEncoder:
    """QLIP's text tower: captions -> ``(B, max_len, text width)`` float32."""

    def __init__(self, qlip_model, max_len: int, pooled: bool = False):
        if qlip_model.text is None:
            raise QLIPError("text.encoder=qlip needs a QLIP checkpoint with a text tower (stage 1); this one has "
                            "none (stage 2 drops it): give text.model=<stage-1 checkpoint> or text.encoder=t5")
        ctx = qlip_model.config.text.context_length
        if not 1 <= max_len <= ctx:
            raise ConfigError(f"text.max_len must be in [1, {ctx}] for QLIP's text tower, got {max_len}")
        self.model, self.max_len, self.pooled = qlip_model.eval(), max_len, pooled
        self.embed_dim = qlip_model.config.embed_dim
        self.dim = qlip_model.config.text.width + (self.embed_dim if pooled else 0)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.model.tokenizer(list(captions)).to(self.model.device)
        h = self.model.text(tokens)
        feats = h[:, :self.max_len].float()
        if not self.pooled:
            return feats
        e = torch.nn.functional.normalize(self.model.text.pool(h, tokens).float(), dim=-1) * self.embed_dim ** 0.5
        return torch.cat([feats, e[:, None].expand(-1, feats.shape[1], -1)], dim=-1)


class CaptionIds:
    """``text.encoder=embedding``: captions -> ``(B, max_len)`` int64 CLIP BPE ids for the
    generator's learned embedding (``vocab_size`` rows)."""

    dim = 0

    def __init__(self, max_len: int):
        from ..text import Tokenizer
        if max_len < 2:
            raise ConfigError(f"text.max_len must be >= 2 with text.encoder=embedding (start and end tokens), "
                              f"got {max_len}")
        self.tokenizer, self.max_len = Tokenizer(context_length=max_len), max_len
        self.vocab_size = self.tokenizer.eot_token_id + 1

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions)).long()


def byte_tokenizer(captions: Sequence[str], max_len: int) -> Dict[str, torch.Tensor]:
    """ByT5-style ids (byte + 3, end 1, pad 0), ``max_len`` per row with the end kept."""
    ids = torch.zeros(len(captions), max_len, dtype=torch.long)
    for i, c in enumerate(captions):
        row = [b + 3 for b in c.encode("utf-8")][:max_len - 1] + [1]
        ids[i, :len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class T5TextEncoder:
    """A ``transformers`` T5 encoder: captions -> ``(B, max_len, d_model)`` float32, zero at pads."""

    def __init__(self, model: Optional[str], max_len: int, t5_config: Optional[Dict[str, Any]] = None,
                 seed: int = 0, device="cpu"):
        require_transformers_models()  # or a one-line error: not installed, or too new for this torch
        from transformers import AutoTokenizer, T5Config, T5EncoderModel
        self.max_len = max_len
        if t5_config is not None:
            with _seeded(seed):
                self.encoder = T5EncoderModel(T5Config(**t5_config))
            self.tokenize: Callable = lambda caps: byte_tokenizer(caps, max_len)
        else:
            name = model or "google/flan-t5-xl"
            try:
                self.encoder = T5EncoderModel.from_pretrained(name)
                tok = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise QLIPError(f"cannot load the T5 encoder {name!r} ({str(e).splitlines()[0][:160]}); offline "
                                "(HF_HUB_OFFLINE=1) it must already be in the Hugging Face cache or be a local "
                                "folder") from None
            self.tokenize = lambda caps: tok(list(caps), padding="max_length", max_length=max_len, truncation=True,
                                             return_tensors="pt")
        self.encoder = self.encoder.to(device).eval().requires_grad_(False)
        self.dim = self.encoder.config.d_model

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        dev = next(self.encoder.parameters()).device
        t = {k: v.to(dev) for k, v in self.tokenize(captions).items()}
        h = self.encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        return (h * t["attention_mask"][..., None]).float()


def check_pooled(encoder: str, pooled: bool) -> None:
    """``text.pooled`` needs QLIP's text tower (the aligned caption embedding): one-line ConfigError."""
    if pooled and encoder != "qlip":
        raise ConfigError(f"text.pooled is for text.encoder=qlip (the aligned caption embedding); {encoder} has none")


def build_text_encoder(spec: Dict[str, Any], device="cpu"):
    """An encoder from a spec ``{"encoder": "qlip"|"t5", "model", "random_init", "seed", "max_len",
    "pooled", "t5_config"}`` (the ``text`` section of a recipe; stored in the generator's ``config.json``)."""
    kind = spec.get("encoder", "qlip")
    if kind == "qlip":
        if not spec.get("model"):
            raise ConfigError("text.model must name the QLIP whose text tower encodes the captions "
                              "(a stage-1 checkpoint folder or a preset with text.random_init)")
        return QLIPTextEncoder(load_qlip(spec["model"], spec.get("random_init", False), spec.get("seed", 0), device),
                               spec.get("max_len", 16), spec.get("pooled", False))
    if kind == "embedding":
        check_pooled(kind, spec.get("pooled", False))
        return CaptionIds(spec.get("max_len", 16))
    if kind == "t5":
        check_pooled(kind, spec.get("pooled", False))
        return T5TextEncoder(spec.get("model"), spec.get("max_len", 16), spec.get("t5_config"), spec.get("seed", 0),
                             device)
    raise ConfigError(f"text.encoder must be one of {', '.join(ENCODERS)}, got {kind!r}")


class TextFeatures:
    """Captions -> features through ``encoder``, with an in-memory cache of ``cache_size``
    captions (least recently used out; 0 = no cache). Features are deterministic, so the cache
    never changes results."""

    def __init__(self, encoder, cache_size: int = 4096):
        self.encoder, self.cache_size = encoder, cache_size
        self._cache: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def vocab_size(self) -> int:
        """Rows of the generator's learned caption embedding (``embedding`` encoder), else 0."""
        return getattr(self.encoder, "vocab_size", 0)

    def __call__(self, captions: List[str], device=None) -> torch.Tensor:
        if self.cache_size <= 0:
            out = self.encoder(captions)
            return out if device is None else out.to(device)
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            feats = self.encoder(missing).cpu()
            for c, f in zip(missing, feats):
                self._cache[c] = f
        for c in captions:
            self._cache.move_to_end(c)
        out = torch.stack([self._cache[c] for c in captions])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out if device is None else out.to(device)
