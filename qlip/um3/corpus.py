"""A tiny synthetic English corpus: the text-only task of ``qlip demo um3`` (no download).

Sentences from a small grammar with structure a tiny byte-level model can learn in minutes and
a perplexity that still says something: subject-verb agreement (``the dog runs`` / ``the dogs
run``), verbs that take only fitting objects (animals eat food, people read texts), place and
time phrases, and occasional subordinate clauses. No colour or shape words occur (the
captions carry those), so the text task and the image tasks share the language's function words
but not its content words.

    text = synthetic_corpus(2000, seed=0)   # 2000 sentences, one per line; a pure function of seed
"""
from __future__ import annotations

import random
from typing import List, Tuple

# noun (singular, plural), its kind: which verbs it can be the subject of
_SUBJECTS: List[Tuple[str, str, str]] = [
    ("dog", "dogs", "animal"), ("cat", "cats", "animal"), ("horse", "horses", "animal"),
    ("bird", "birds", "animal"), ("goat", "goats", "animal"), ("fox", "foxes", "animal"),
    ("farmer", "farmers", "person"), ("teacher", "teachers", "person"), ("child", "children", "person"),
    ("baker", "bakers", "person"), ("sailor", "sailors", "person"), ("doctor", "doctors", "person"),
]
# verb (3rd person singular, plural), subject kind, object kind
_VERBS: List[Tuple[str, str, str, str]] = [
    ("eats", "eat", "animal", "food"), ("finds", "find", "animal", "food"), ("wants", "want", "animal", "food"),
    ("chases", "chase", "animal", "animal"), ("watches", "watch", "animal", "animal"),
    ("reads", "read", "person", "text"), ("writes", "write", "person", "text"), ("sells", "sell", "person", "food"),
    ("cooks", "cook", "person", "food"), ("feeds", "feed", "person", "animal"), ("helps", "help", "person", "person"),
    ("meets", "meet", "person", "person"),
]
_INTRANSITIVE: List[Tuple[str, str, str]] = [
    ("runs", "run", "animal"), ("sleeps", "sleep", "animal"), ("sings", "sing", "animal"),
    ("works", "work", "person"), ("waits", "wait", "person"), ("laughs", "laugh", "person"),
]
_OBJECTS = {
    "food": ["bread", "apples", "soup", "cheese", "grain", "fish", "honey", "rice"],
    "text": ["a letter", "a book", "the news", "a poem", "a story", "the map", "a note"],
}
_ADJECTIVES = ["old", "young", "small", "tired", "happy", "quiet", "clever", "hungry"]
_PLACES = ["in the garden", "near the river", "at the market", "in the village", "on the hill",
           "by the sea", "in the kitchen", "under the bridge"]
_TIMES = ["in the morning", "at night", "every day", "after lunch", "in the winter", "on sunday"]
_CLAUSES = ["because it is late", "while the sun sets", "when the bell rings", "before the rain comes",
            "after the storm", "as the wind blows"]


def _noun_phrase(rng: random.Random, kind: str) -> Tuple[str, bool]:
    """``("the old dog", plural)`` for a subject of ``kind`` (animal / person)."""
    word = rng.choice([s for s in _SUBJECTS if s[2] == kind])
    plural = rng.random() < 0.35
    det = rng.choice(["the", "the", "some", "many"]) if plural else rng.choice(["the", "the", "a", "one"])
    adj = [rng.choice(_ADJECTIVES)] if rng.random() < 0.4 else []
    if det == "a" and (adj or [word[0]])[0][0] in "aeiou":
        det = "an"
    return " ".join([det] + adj + [word[1] if plural else word[0]]), plural


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar (lower case, ends with a full stop)."""
    kind = rng.choice(["animal", "person"])
    subject, plural = _noun_phrase(rng, kind)
    if rng.random() < 0.3:
        verb = rng.choice([v for v in _INTRANSITIVE if v[2] == kind])
        words = [subject, verb[1] if plural else verb[0]]
    else:
        verb = rng.choice([v for v in _VERBS if v[2] == kind])
        obj = (_noun_phrase(rng, verb[3])[0] if verb[3] in ("animal", "person")
               else rng.choice(_OBJECTS[verb[3]]))
        words = [subject, verb[1] if plural else verb[0], obj]
    if rng.random() < 0.5:
        words.append(rng.choice(_PLACES))
    if rng.random() < 0.3:
        words.append(rng.choice(_TIMES))
    if rng.random() < 0.15:
        words.append(rng.choice(_CLAUSES))
    return " ".join(words) + "."


def synthetic_corpus(n_sentences: int, seed: int = 0) -> str:
    """``n_sentences`` sentences, one per line (a pure function of ``n_sentences`` and ``seed``)."""
    rng = random.Random(seed)
    return "\n".join(sentence(rng) for _ in range(n_sentences)) + "\n"
