"""Two lanes: one job list in this process, the other in a spawned process at the same time.

Every demo trains small models that use threads badly; on 2 cores two 1-thread lanes beat one
2-thread lane (docs/demo.md, "Third round"). This is the one place where the second lane is
started, waited for and cleaned up:

* the spawned lane sends ``("ok", result)`` or ``("error", traceback)`` through a queue, so an
  exception there is raised here (after this lane's own work) with its traceback;
* a lane that dies without a result (killed, out of memory) is reported with its exit code;
* if this process fails or is interrupted, the other lane is terminated; if this process is
  killed by a signal (no cleanup runs), the other lane notices its parent is gone and exits.
"""
from __future__ import annotations

import os
import pickle
import time
import traceback
from typing import Any, Callable, Sequence, Tuple


def exit_with_parent(parent: int, poll_s: float = 5.0) -> None:
    """A daemon thread that ends this (spawned) process once its parent is gone: a parent killed by
    a signal runs no cleanup, and an orphaned lane would train on for nothing."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def lane_entry(target: Callable[..., Any], args: Sequence[Any], results, parent: int = 0) -> None:
    """Entry point of the spawned lane: ``("ok", target(*args))`` or ``("error", traceback)`` into
    ``results``; the traceback is also printed at once (the parent raises it after its own lane)."""
    if parent:
        exit_with_parent(parent)
    try:
        # plain pickle, as bytes: a queue sends torch tensors as shared-memory handles, which are gone
        # (ConnectionResetError in the parent) once this process has exited
        results.put(("ok", pickle.dumps(target(*args), protocol=pickle.HIGHEST_PROTOCOL)))
    except Exception:  # reported to the parent, which raises it
        traceback.print_exc()
        results.put(("error", traceback.format_exc()))


def wait_for_lane(proc, results, what: str, poll_s: float = 5.0, hint: str = "") -> Any:
    """The spawned lane's result; ``RuntimeError`` naming ``what`` if it failed or died without one."""
    import queue
    while True:
        try:
            status, payload = results.get(timeout=poll_s)
            break
        except queue.Empty:
            if not proc.is_alive():
                try:  # it may have put its result and exited since the timeout
                    status, payload = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    raise RuntimeError(f"{what} ended without a result (exit code {proc.exitcode}){hint}") from None
    if status != "ok":
        raise RuntimeError(f"{what} failed:\n{payload}")
    return pickle.loads(payload)  # our own child's result (lane_entry)


def run_two_lanes(here: Callable[[], Any], target: Callable[..., Any], args: Sequence[Any], *, name: str,
                  what: str, hint: str = "", poll_s: float = 5.0) -> Tuple[Any, Any]:
    """Run ``target(*args)`` in a spawned process (a module-level function: it is pickled by name)
    while ``here()`` runs in this one; returns both results. ``what`` names the spawned lane in
    errors, ``hint`` is appended when it died without a result (e.g. how to resume)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=lane_entry, args=(target, tuple(args), results, os.getpid()), name=name)
    proc.start()
    try:
        mine = here()
        return mine, wait_for_lane(proc, results, what, poll_s, hint)
    except BaseException:
        if proc.is_alive():  # fail fast: do not train the other lane for nothing
            proc.terminate()
        raise
    finally:
        proc.join()
