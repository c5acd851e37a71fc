"""The text tokenizer of a UM3 model: the starting Llama's ``tokenizer.json``, read with the
``tokenizers`` library (installed with ``qlip[llm]``; no ``transformers`` needed).

:func:`make_byte_tokenizer` builds a tiny one without any download, for tests and the demo: a
byte-level BPE with no merges, i.e. one token per UTF-8 byte (256 tokens, GPT-2's byte-to-unicode
alphabet, as Llama 3's own tokenizer uses) plus ``<|begin_of_text|>`` and ``<|end_of_text|>``
(ids 256 and 257). Any text round-trips through it exactly. :func:`train_byte_bpe` trains a
small byte-level BPE on given texts instead (the demo's: words become single tokens).
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence

from ..errors import CheckpointError, QLIPError

TOKENIZER_FILE = "tokenizer.json"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise QLIPError("UM3 needs the 'tokenizers' package for its text tokenizer: pip install 'qlip[llm]'") from None
    return tokenizers


class TextTokenizer:
    """``encode(text) -> ids`` (no special tokens added), ``decode(ids) -> text``, ``bos_id``, ``eos_id``."""

    def __init__(self, tok, bos_id: int, eos_id: int, path: Optional[str] = None):
        self.tok, self.bos_id, self.eos_id, self.path = tok, int(bos_id), int(eos_id), path

    @classmethod
    def from_folder(cls, folder: str, bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> "TextTokenizer":
        """``folder/tokenizer.json``; ``bos_id``/``eos_id`` default to the ids of Llama 3's
        ``<|begin_of_text|>`` / ``<|end_of_text|>``."""
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no {TOKENIZER_FILE} (UM3 reads the starting model's fast tokenizer)")
        tok = _tokenizers().Tokenizer.from_file(path)
        bos = bos_id if bos_id is not None else tok.token_to_id(BOS)
        eos = eos_id if eos_id is not None else tok.token_to_id(EOS)
        if bos is None or eos is None:
            raise CheckpointError(f"{path}: cannot tell the BOS/EOS ids (no {BOS}/{EOS} tokens and "
                                  "none in config.json)")
        return cls(tok, bos, eos, path)

    @property
    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.tok.save(os.path.join(folder, TOKENIZER_FILE))


def make_byte_tokenizer() -> TextTokenizer:
    """A byte-level tokenizer (one token per byte, ids 0..255; BOS 256, EOS 257). No download."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable-unicode table in byte order, so id == byte value
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    return TextTokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS))


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE trained on ``texts`` (:func:`qlip.data.bpe.train_byte_level_bpe`, no
    download): the 256 byte tokens, merges up to ``vocab_size`` tokens (on a small corpus every
    frequent word becomes one token, e.g. ``" circle"``), then ``<|begin_of_text|>`` /
    ``<|end_of_text|>`` (the last two ids). Any text still round-trips exactly. The demo's choice: a
    tiny model learns words in far fewer steps than bytes."""
    from ..data.bpe import train_byte_level_bpe
    tok = train_byte_level_bpe(texts, vocab_size, special_tokens_last=(BOS, EOS))
    return TextTokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS))


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256+."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
