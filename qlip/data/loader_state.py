"""The checks every resumable loader makes when it restores a saved position.

A training checkpoint stores ``[state of rank 0, state of rank 1, ...]`` (or one dict). A loader
takes its own rank's entry and refuses a state saved with other settings (seed, batch size,
world size, data, ...): resuming with them would silently give other batches.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Union

from ..errors import DataError


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
