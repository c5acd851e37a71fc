"""TokenShardDataset / TokenLoader on a hand-written token-shard directory (no model): random
access, exact resume, epoch-wise reshuffle, rank-disjoint slices, settings checks."""
import json

import numpy as np
import pytest
import torch

from qlip.data.tokens import (FORMAT, FORMAT_VERSION, TokenLoader, TokenShardDataset, build_index,
                              prepare_output, write_part)
from qlip.errors import DataError

COUNTS = [10, 0, 17, 10]  # an empty part (every sample of its shard corrupt) is allowed
N = sum(COUNTS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tokdir"))
    config = {"format": FORMAT, "version": FORMAT_VERSION, "model": {"name": "none"}, "bits": 28, "grid": [2, 3],
              "dtype": "int32", "preprocess": {}, "sources": [f"s{i}.tar" for i in range(len(COUNTS))],
              "fingerprint": "test"}
    prepare_output(out, config)
    start = 0
    for i, n in enumerate(COUNTS):
        g = np.arange(start, start + n)
        ids = (g[:, None] * 6 + np.arange(6)).astype(np.int32)  # row of sample g: 6g .. 6g+5
        write_part(out, i, config, ids, [f"k{j}" for j in g], [f"caption {j}" for j in g], {"incomplete": i})
        start += n
    assert build_index(out)["count"] == N
    return out


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def sample_numbers(batches):
    return [int(k[1:]) for b in batches for k in b["keys"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["ids"], y["ids"]) and x["captions"] == y["captions"] and x["keys"] == y["keys"]


def test_dataset_random_access(root):
    ds = TokenShardDataset(root)
    assert len(ds) == N and ds.grid == (2, 3) and ds.seq_len == 6 and ds.index["skipped"] == 6
    for i in (0, 9, 10, 26, 27, N - 1, -1):
        j = i % N
        assert ds.ids[i].tolist() == list(range(6 * j, 6 * j + 6))
        assert ds.captions[i] == f"caption {j}" and ds.keys[i] == f"k{j}"
    idx = np.array([36, 0, 12, 11, 27, 9])  # across parts and out of order
    assert np.array_equal(ds.ids[idx][:, 0], idx * 6)
    item = ds[12]
    assert item["ids"].dtype == torch.int64 and item["ids"][0] == 72 and item["caption"] == "caption 12"
    b = ds.batch([3, 30])
    assert b["ids"].shape == (2, 6) and b["ids"].dtype == torch.int64 and b["keys"] == ["k3", "k30"]
    for bad in (N, -N - 1):
        with pytest.raises(IndexError):
            ds.ids[bad]
    with pytest.raises(IndexError):
        ds.ids[np.array([0, N])]


@pytest.mark.parametrize("infinite", [True, False])
def test_exact_resume_after_k_batches(root, infinite):
    kw = dict(seed=3, infinite=infinite)
    if infinite:
        ref = take(TokenLoader(root, 5, **kw), 20)
    else:  # three epochs, one for loop each
        loader = TokenLoader(root, 5, **kw)
        ref = [b for _ in range(3) for b in loader]
        assert len(ref) == 3 * (N // 5)
    for k in (1, 7, 8, 13):  # 7 batches = one full epoch (37 // 5): the resume lands on an epoch end
        first = TokenLoader(root, 5, **kw)
        got = []
        if infinite:
            got = take(first, k)
        else:
            while len(got) < k:
                for b in first:
                    got.append(b)
                    if len(got) == k:
                        break
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON / torch.save round trip
        fresh = TokenLoader(root, 5, **kw)
        fresh.load_state_dict(state)
        assert fresh.stats == {"samples": 5 * k, "skipped": 0} and fresh.batches == k
        if infinite:
            rest = take(fresh, 20 - k)
        else:
            rest = []
            while len(got) + len(rest) < len(ref):
                rest += list(fresh)
        assert_same_batches(got + rest, ref)


def test_epochs_reshuffle_and_cover_every_sample(root):
    loader = TokenLoader(root, 4, seed=0, infinite=False, drop_last=False)
    e0, e1 = sample_numbers(list(loader)), sample_numbers(list(loader))
    assert sorted(e0) == sorted(e1) == list(range(N))   # each epoch: every sample exactly once
    assert e0 != e1 and loader.epoch == 1                # reshuffled
    assert sample_numbers(list(TokenLoader(root, 4, seed=0, infinite=False, drop_last=False))) == e0
    assert sample_numbers(list(TokenLoader(root, 4, seed=1, infinite=False, drop_last=False))) != e0
    plain = TokenLoader(root, 4, shuffle=False, infinite=False, drop_last=False)
    assert sample_numbers(list(plain)) == list(range(N))
    dropped = TokenLoader(root, 4, seed=0, infinite=False)  # drop_last: 9 full batches, no short one
    assert [len(b["keys"]) for b in dropped] == [4] * 9 and len(dropped) == 9
    # infinite: a batch spans the epoch boundary, nothing is dropped
    inf = sample_numbers(take(TokenLoader(root, 4, seed=0), 19))
    assert inf[:N] == e0 and inf[N:2 * N] == e1


def test_ranks_are_disjoint_and_equal_sized(root):
    per_rank = [sample_numbers(list(TokenLoader(root, 3, seed=5, rank=r, world_size=3, infinite=False,
                                                drop_last=False))) for r in range(3)]
    assert [len(p) for p in per_rank] == [N // 3] * 3
    union = set().union(*map(set, per_rank))
    assert len(union) == 3 * (N // 3)                    # disjoint
    assert TokenLoader(root, 3, world_size=3, rank=2, infinite=False).__len__() == (N // 3) // 3


def test_state_checks(root):
    loader = TokenLoader(root, 5, seed=0)
    take(loader, 2)
    state = loader.state_dict()
    for other in (TokenLoader(root, 4, seed=0), TokenLoader(root, 5, seed=1), TokenLoader(root, 5, seed=0, rank=1,
                                                                                          world_size=2)):
        with pytest.raises(DataError, match="other settings"):
            other.load_state_dict(state)
    both = [dict(state, rank=1), state]  # every rank's states, e.g. from all_gather_object
    fresh = TokenLoader(root, 5, seed=0)
    fresh.load_state_dict(both)
    assert fresh.position == loader.position and fresh.batches == 2
    with pytest.raises(DataError, match="rank 0 is not in a world of size 0"):
        TokenLoader(root, 5, world_size=0)
    with pytest.raises(DataError, match="cannot feed 100 ranks"):
        TokenLoader(root, 5, world_size=100)
