"""A tiny random language model in Hugging Face format, built offline (tests and the demo).

:func:`build_tokenizer` makes a byte-level BPE tokenizer with :mod:`qlip.data.bpe` (the trainer of
UM3's tiny tokenizer too): the 256 byte symbols (GPT-2's byte-to-unicode alphabet, so any text
encodes), merges learned from the given texts (none: one token per byte) and the special tokens
``<s>``, ``</s>``, ``<pad>`` and ``<image>``; no download. :func:`build_tiny_llm` pairs it with a
randomly initialised ``LlamaForCausalLM`` from a ``LlamaConfig`` and saves both to a folder that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (and so ``model.llm`` of a VLM
recipe) read offline. The tokenizer has no chat template: VLMs on it use the plain template
(:mod:`qlip.vlm.conversation`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from ..compat import require_transformers_models

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<image>")


MERGE_TEXTS = ("rendered", "turns")


def merge_texts(records: Sequence[Dict[str, Any]], which: str = "rendered") -> List[str]:
    """The texts a tiny tokenizer's merges are learned from, from LLaVA records: ``rendered``, each
    conversation as the model reads it (plain template, so ``USER:`` / ``ASSISTANT:`` become a few
    tokens and multi-turn conversations stay short: docs/vlm.md "Issue 16, second round"); ``turns``,
    the turns' texts alone (the template is then spelt nearly byte by byte)."""
    from ..errors import ConfigError
    from .conversation import from_llava, render_plain
    if which == "rendered":
        return [render_plain(from_llava(r["conversations"]), False) for r in records]
    if which == "turns":
        return [t["value"] for r in records for t in r["conversations"]]
    raise ConfigError(f"merge texts must be one of {', '.join(MERGE_TEXTS)}, got {which!r}")


def build_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast``: byte-level BPE (merges from ``texts`` up to ``vocab_size``
    tokens; no texts: bytes only; :func:`qlip.data.bpe.train_byte_level_bpe`), ``<s>`` bos,
    ``</s>`` eos, ``<pad>``, ``<image>`` (ids 0-3, before the bytes)."""
    from transformers import PreTrainedTokenizerFast

    from ..data.bpe import train_byte_level_bpe
    tok = train_byte_level_bpe(texts, vocab_size, special_tokens_first=SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])


def build_tiny_llm(folder: str, texts: Optional[Iterable[str]] = None, vocab_size: int = 512, hidden_size: int = 64,
                   layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate_size: int = 128,
                   max_positions: int = 512, seed: int = 0) -> str:
    """Save a random ``LlamaForCausalLM`` and its tokenizer (:func:`build_tokenizer`) to ``folder``."""
    require_transformers_models()
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(texts, vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
