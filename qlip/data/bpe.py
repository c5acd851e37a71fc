"""Train a small byte-level BPE on given texts, offline: the one trainer behind the tiny tokenizers
of the downstream models (:func:`qlip.vlm.tiny.build_tokenizer`, :func:`qlip.um3.text.train_byte_bpe`).

The ``tokenizers`` library's BPE trainer (installed with ``qlip[llm]``) with GPT-2's byte-level
pre-tokenizer and decoder: the 256 byte symbols (GPT-2's byte-to-unicode alphabet) are always in
the vocabulary, so any text encodes and decodes exactly, and the merges learned from ``texts`` make
frequent words single tokens (on a small corpus, e.g. ``" circle"``), which a tiny language model
learns in far fewer steps than bytes. Special tokens go either first (ids ``0..k-1``, before the
bytes, as the trainer places them) or last (after the merges, as a pretrained Llama 3 has its
``<|begin_of_text|>``); the callers choose, and their vocabularies are pinned by tests, because
the demos' figures depend on them. It lives in the data layer because both downstream packages
(mutually independent) use it.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from ..errors import QLIPError


def train_byte_level_bpe(texts: Optional[Iterable[str]], vocab_size: int, special_tokens_first: Sequence[str] = (),
                         special_tokens_last: Sequence[str] = ()):
    """A ``tokenizers.Tokenizer``: byte-level BPE with merges learned from ``texts``.

    ``vocab_size`` counts every token, special ones included (more only when the bytes and the
    special tokens alone are more). No texts (``None`` or empty): no merges, the bytes and the
    special tokens only. ``special_tokens_first`` get ids ``0..k-1``; ``special_tokens_last``
    are added after the merges, so the byte and merge ids do not depend on them.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise QLIPError("training a byte-level BPE needs the 'tokenizers' package: pip install 'qlip[llm]'") from None
    texts = list(texts or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # vocab_size 0 = no merges: the trainer still keeps the whole initial alphabet and the special tokens
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special_tokens_last) if texts else 0,
                                  special_tokens=list(special_tokens_first), show_progress=False,
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()))
    tok.train_from_iterator(texts or [""], trainer=trainer)
    if special_tokens_last:
        tok.add_special_tokens(list(special_tokens_last))
    return tok
