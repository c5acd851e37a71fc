"""Training: the engine, QLIP's two-stage task, recipes, checkpoints and exact resume (docs/training.md).

``train(load_recipe("recipe.yaml"), "runs/x")`` trains any task; :class:`Task` is what a model
brings to the engine, :func:`register_task` names it for recipes' ``task:`` key.
"""
from .engine import Engine, train
from .recipe import Recipe, load_recipe
from .task import StepLog, Task
from .tasks import get_task, list_tasks, register_task

__all__ = ["Engine", "train", "Recipe", "load_recipe", "Task", "StepLog", "get_task", "list_tasks",
           "register_task"]
