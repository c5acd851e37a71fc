"""The one byte-level BPE trainer (qlip.data.bpe) and its two wrappers, VLM's ``build_tokenizer``
and UM3's ``train_byte_bpe``. The expected ids below were produced by the two separate trainers
the wrappers replaced (commit 5a3bcff) on the same captions: the demos' figures depend on these
vocabularies, so they must not move."""
import json
import sys

import pytest

from qlip.data.bpe import train_byte_level_bpe
from qlip.errors import QLIPError

TEXTS = ["a red circle at the top left", "a small blue square in the middle",
         "What color is the shape? <image>", "a large green triangle at the bottom right",
         "a red square at the top right", "a blue circle in the middle"]
PROBES = ["a red circle", "What color is the triangle?", "héllo wörld 🙂"]
# byte-level ids of PROBES[2] without merges, offset by where the bytes start (4 VLM specials first)
UNICODE_BYTES = [71, 127, 102, 75, 75, 78, 220, 86, 127, 114, 81, 75, 67, 220, 172, 253, 247, 224]


def _merges(tok):
    return json.loads(tok.to_str())["model"]["merges"]


def test_vlm_tokenizer_ids_are_those_of_the_old_trainer():
    from qlip.vlm.tiny import build_tokenizer
    tok = build_tokenizer(TEXTS, 300)
    assert len(tok) == 300
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<image>")] == [0, 1, 2, 3]
    assert [tok.encode(p, add_special_tokens=False) for p in PROBES] == [
        [68, 293, 298],
        [299, 265, 269, 82, 79, 82, 85, 270, 86, 263, 260, 267, 68, 81, 74, 262, 34],
        [i + 4 for i in UNICODE_BYTES]]
    assert tok.convert_ids_to_tokens([293, 298]) == ["Ġred", "Ġcircle"]
    assert [tok.decode(tok.encode(p, add_special_tokens=False)) for p in PROBES] == PROBES


def test_um3_tokenizer_ids_are_those_of_the_old_trainer():
    from qlip.um3.text import train_byte_bpe
    tok = train_byte_bpe(iter(TEXTS), 300)   # any iterable
    assert tok.size == 300 and (tok.bos_id, tok.eos_id) == (298, 299)
    assert [tok.encode(p) for p in PROBES] == [
        [64, 289, 294],
        [295, 261, 265, 78, 75, 78, 81, 266, 82, 259, 256, 263, 296, 70, 258, 30],
        UNICODE_BYTES]
    assert [tok.decode(tok.encode(p)) for p in PROBES] == PROBES


def test_no_texts_means_bytes_and_special_tokens_only():
    from qlip.um3.text import train_byte_bpe
    from qlip.vlm.tiny import build_tokenizer
    a_red_circle = [64, 220, 81, 68, 67, 220, 66, 72, 81, 66, 75, 68]
    for vlm in (build_tokenizer(None), build_tokenizer([], 512)):
        assert len(vlm) == 260
        assert vlm.encode("a red circle", add_special_tokens=False) == [i + 4 for i in a_red_circle]
    um3 = train_byte_bpe([], 512)
    assert um3.size == 258 and (um3.bos_id, um3.eos_id) == (256, 257)
    assert um3.encode("a red circle") == a_red_circle


def test_special_tokens_first_or_last_and_the_same_merges():
    """vocab_size counts every token; the special tokens' place does not change what is learned:
    both orders learn the same merges, one wrapper just stops 2 merges later (4 vs 2 specials)."""
    first = train_byte_level_bpe(TEXTS, 300, special_tokens_first=["<a>", "<b>", "<c>", "<d>"])
    last = train_byte_level_bpe(TEXTS, 300, special_tokens_last=["<x>", "<y>"])
    assert first.get_vocab_size() == last.get_vocab_size() == 300
    assert [first.token_to_id(t) for t in ["<a>", "<b>", "<c>", "<d>"]] == [0, 1, 2, 3]
    assert [last.token_to_id(t) for t in ["<x>", "<y>"]] == [298, 299]
    assert len(_merges(first)) == 40 and len(_merges(last)) == 42
    assert _merges(last)[:40] == _merges(first)
    assert _merges(first)[:3] == [["Ġ", "t"], ["h", "e"], ["l", "e"]]
    plain = train_byte_level_bpe(TEXTS, 298)   # the trailing specials leave the other ids alone
    assert {t: i for t, i in last.get_vocab().items() if i < 298} == plain.get_vocab()


def test_a_missing_tokenizers_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(QLIPError, match="pip install 'qlip\\[llm\\]'"):
        train_byte_level_bpe(TEXTS, 300)
