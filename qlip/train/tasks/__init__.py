"""Training tasks by name: a recipe's ``task:`` key (default ``qlip``).

A name maps to ``"module:Class"`` and is imported when first used, so that a task's
dependencies load only when it trains. Downstream packages add theirs with
:func:`register_task`; a recipe may also name any importable ``package.module:Class`` directly.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Type

from ...errors import ConfigError

# The downstream tasks are named here by string (resolved at use, so the engine imports none of
# them); their packages also register themselves on import.
_TASKS: Dict[str, str] = {
    "qlip": "qlip.train.tasks.qlip:QLIPTask",
    "causal_lm": "qlip.train.tasks.causal_lm:CausalLMTask",
    "t2i": "qlip.gen.task:T2ITask",
    "vlm": "qlip.vlm.task:VLMTask",
    "um3": "qlip.um3.task:UM3Task",
}


def register_task(name: str, target: str) -> None:
    """Make ``task: name`` in recipes resolve to ``target`` (``"package.module:Class"``)."""
    if ":" not in target:
        raise ValueError(f"task target must be 'package.module:Class', got {target!r}")
    _TASKS[name] = target


def list_tasks() -> List[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Type:
    """The task class for a recipe's ``task`` value (a registered name or ``module:Class``)."""
    target = _TASKS.get(name, name if ":" in name else None)
    if target is None:
        raise ConfigError(f"unknown task {name!r} (known: {', '.join(list_tasks())}, or package.module:Class)")
    module, _, cls = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise ConfigError(f"task {name!r}: no module {module!r}") from None
        raise  # a dependency of the task is missing or broken: let the real error through
    try:
        return getattr(mod, cls)
    except AttributeError:
        raise ConfigError(f"task {name!r}: {module} has no {cls!r}") from None
