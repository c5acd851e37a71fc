"""How a demo's training run continues under ``--resume``, written once for the demos
(``qlip demo``, ``t2i``, ``um3``): a finished run (its ``summary.json`` says it reached the
recipe's steps and its final model exists) is reused; an interrupted one continues from its
latest checkpoint through the engine's exact resume; otherwise the run starts over."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional


def finished_run(run_dir: str, steps: int, resume: bool,
                 also_done: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Optional[Dict[str, Any]]:
    """``run_dir``'s summary when ``resume`` is asked for and the run finished: it trained ``steps``
    steps (or ``also_done(summary)`` holds, e.g. a run stopped by its time limit) and its final model
    is on disk; else None."""
    summ = os.path.join(run_dir, "summary.json")
    if not (resume and os.path.isfile(summ)):
        return None
    with open(summ, encoding="utf-8") as f:
        s = json.load(f)
    done = s.get("steps") == steps or (also_done is not None and also_done(s))
    return s if done and os.path.isdir(s.get("final_model", "")) else None


def can_resume(run_dir: str, resume: bool) -> bool:
    """Whether ``resume`` is asked for and ``run_dir`` holds a checkpoint to continue from."""
    from ..train.state import latest_checkpoint
    return resume and latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
