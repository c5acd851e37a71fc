"""The checks every resumable loader makes when it restores a saved position.

A training checkpoint stores ``[state of rank 0, state of rank 1, ...]`` (or one dict). A loader
takes its own rank's entry and refuses a state saved with other settings (seed, batch size,
world size, data, ...): resuming with them would silently give other batches.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Sequence, Union

from ..errors import DataError


def check_loader_args(batch_size: int, rank: int, world_size: int) -> None:
    """DataError unless the batch size is positive and ``rank`` lies in ``[0, world_size)``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")


def rank_state(state: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]], rank: int, what: str) -> Dict[str, Any]:
    """``state`` itself, or the single entry of a list of rank states whose ``rank`` is ``rank``."""
    if isinstance(state, Mapping):
        return dict(state)
    mine = [s for s in state if isinstance(s, Mapping) and s.get("rank") == rank]
    if len(mine) != 1:
        raise DataError(f"{what} states hold no single entry for rank {rank}")
    return dict(mine[0])


def check_loader_state(state: Mapping[str, Any], version: int, settings: Mapping[str, Any], what: str) -> None:
    """DataError unless ``state`` has format ``version`` and was saved with ``settings``."""
    if state.get("version") != version:
        raise DataError(f"{what} state version {state.get('version')} is not {version}")
    diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in settings.items() if state.get(k) != v]
    if diff:
        raise DataError(f"{what} state was saved with other settings or data: " + ", ".join(diff))


class IndexedLoader:
    """An infinite stream whose batch ``i`` is a pure function of ``(settings, i)``: resuming needs
    only the number of batches handed out. Subclasses set ``rank``, ``what`` (for messages) and
    implement ``batch(index)`` and ``_settings()``; they call ``super().__init__()``."""

    STATE_VERSION = 1
    what = "loader"

    def __init__(self) -> None:
        self.index = 0  # batches handed out
        self.stats: Dict[str, int] = {"skipped": 0}
        self.replicated = False

    def batch(self, index: int) -> Dict[str, Any]:
        raise NotImplementedError

    def _settings(self) -> Dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            b = self.batch(self.index)
            self.index += 1
            yield b

    def state_dict(self) -> Dict[str, Any]:
        return {"version": self.STATE_VERSION, **self._settings(), "index": self.index}

    def load_state_dict(self, state) -> None:
        state = rank_state(state, self.rank, self.what)
        check_loader_state(state, self.STATE_VERSION, self._settings(), self.what)
        self.index = int(state["index"])
