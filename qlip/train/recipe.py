"""Training recipes: YAML files validated into dataclasses, with ``key=value`` overrides.

Every key is checked: an unknown or misspelt key is an error naming it, never silently ignored.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..errors import ConfigError


def check(name: str, value: Any, want: str, ok: bool) -> None:
    """One ConfigError naming the key when ``ok`` is false or a number in ``value`` is not finite."""
    finite = all(math.isfinite(x) for x in (value if isinstance(value, (list, tuple)) else [value])
                 if isinstance(x, (int, float)) and not isinstance(x, bool))
    if not (ok and finite):
        raise ConfigError(f"{name} must be {want}, got {value!r}")


# ---- the engine's sections (every task has them; a task may extend them by subclassing) -------
@dataclass
class DataSection:
    train: Optional[Any] = None              # the task's training data: shards (glob / brace pattern / list), a .csv, ...
    batch_size: int = 128                    # per rank, per optimizer step (before accumulation)
    workers: int = 0
    shuffle_buffer: int = 2000
    global_batches: bool = False             # every rank reads the 1-process stream of global batches
                                             # (batch_size * world_size) and keeps its slice: batches
                                             # independent of the number of ranks (costs world_size x decoding)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        check("data.workers", self.workers, ">= 0", self.workers >= 0)
        check("data.shuffle_buffer", self.shuffle_buffer, ">= 0", self.shuffle_buffer >= 0)
        if self.train is not None and not isinstance(self.train, (str, list)):
            raise ConfigError(f"data.train must be a path, a pattern or a list of them, got {self.train!r}")


@dataclass
class OptimSection:
    optimizer: str = "lamb"                  # lamb (timm's, without its own clipping) | adamw
    lr: float = 5e-4                         # peak lr (of parameters the task puts in no group of its own)
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 5.0                   # max global grad norm; 0 = off
    warmup_steps: int = 2000
    steps: int = 120000
    schedule: str = "cosine"                 # cosine | constant
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.optimizer not in ("lamb", "adamw"):
            raise ConfigError(f"optim.optimizer must be lamb or adamw, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        if self.steps < 1:
            raise ConfigError("optim.steps must be >= 1")
        check("optim.lr", self.lr, ">= 0", self.lr >= 0)
        check("optim.eps", self.eps, "> 0", self.eps > 0)
        check("optim.weight_decay", self.weight_decay, ">= 0", self.weight_decay >= 0)
        check("optim.grad_clip", self.grad_clip, ">= 0 (0 = off)", self.grad_clip >= 0)
        check("optim.warmup_steps", self.warmup_steps, ">= 0", self.warmup_steps >= 0)
        check("optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]", 0 <= self.min_lr_ratio <= 1)
        check("optim.betas", list(self.betas), "two values in [0, 1)",
              len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas))


@dataclass
class TrainSection:
    precision: str = "fp32"    # fp32 | bf16 (autocast) | auto (bf16 on a CUDA GPU with bf16 or a CPU with AMX, else fp32)
    grad_accum: int = 1
    fsdp: bool = False         # shard the task's FSDP units across ranks (FSDP2; AdamW only)
    compile: bool = False      # torch.compile each of the task's units (blocks); benchmarks/compile_step.py
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    eval_every: int = 0        # > 0: run the task's evaluation hook every this many steps (and at the end)
    max_time_s: Optional[float] = None   # stop (and checkpoint) after this wall time
    device: Optional[str] = None
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"train.precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.grad_accum < 1:
            raise ConfigError("train.grad_accum must be >= 1")
        check("train.log_every", self.log_every, ">= 1", self.log_every >= 1)
        check("train.ckpt_every", self.ckpt_every, ">= 0 (0 = only at the end)", self.ckpt_every >= 0)
        check("train.keep_ckpts", self.keep_ckpts, ">= 0 (0 = keep all)", self.keep_ckpts >= 0)
        check("train.eval_every", self.eval_every, ">= 0 (0 = off)", self.eval_every >= 0)
        if self.max_time_s is not None:
            check("train.max_time_s", self.max_time_s, "> 0 or empty", self.max_time_s > 0)
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"train.device must be a string, got {self.device!r}")


ENGINE_SECTIONS: Dict[str, type] = {"data": DataSection, "optim": OptimSection, "train": TrainSection}
DEFAULT_TASK = "qlip"


class Recipe:
    """A task name plus its sections: the engine's ``data``, ``optim`` and ``train`` (possibly
    extended by the task) and the task's own (QLIP: ``model``, ``loss``, ``gan``). Sections are
    attributes: ``recipe.optim.lr``. Build with :meth:`from_dict` / :func:`load_recipe`."""

    def __init__(self, task: str, sections: Dict[str, Any]):
        self.__dict__["task"] = task
        self.__dict__["sections"] = dict(sections)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(f"recipe of task {self.task!r} has no section {name!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.task == other.task and self.sections == other.sections

    def __repr__(self) -> str:
        return f"Recipe(task={self.task!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.sections.items()) + ")"

    def to_dict(self) -> Dict[str, Any]:
        return {"task": self.task, **{k: dataclasses.asdict(v) for k, v in self.sections.items()}}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Recipe":
        from .tasks import get_task
        d = dict(d or {})
        task_name = d.pop("task", None) or DEFAULT_TASK
        if not isinstance(task_name, str):
            raise ConfigError(f"recipe key 'task' must be a task name, got {task_name!r}")
        task_cls = get_task(task_name)
        types = section_types(task_cls)
        unknown = sorted(set(d) - set(types))
        if unknown:
            raise ConfigError(f"unknown recipe sections: {', '.join(unknown)} (valid for task {task_name!r}: "
                              f"task, {', '.join(types)})")
        secs = {}
        for name, sub in types.items():
            val = d.get(name) or {}
            if not isinstance(val, dict):
                raise ConfigError(f"recipe section {name!r} must be a mapping")
            fields = {g.name: str(g.type) for g in dataclasses.fields(sub)}
            bad = sorted(set(val) - set(fields))
            if bad:
                raise ConfigError(f"unknown keys in recipe section {name!r}: "
                                  + ", ".join(_suggest(k, fields, name) for k in bad))
            secs[name] = sub(**{k: _coerce(v, fields[k], f"{name}.{k}") for k, v in val.items()})
        return cls(task_name, secs).validate()

    def validate(self) -> "Recipe":
        from .tasks import get_task
        for sec in self.sections.values():
            if hasattr(sec, "validate"):
                sec.validate()
        if self.train.fsdp and self.optim.optimizer != "adamw":
            raise ConfigError("train.fsdp needs optim.optimizer=adamw: timm's LAMB computes its per-parameter "
                              "trust ratio on the local shard of each weight, which would differ from unsharded LAMB")
        get_task(self.task).validate_recipe(self)
        return self


def section_types(task_cls) -> Dict[str, type]:
    """The engine's sections, overridden / extended by the task's ``sections``."""
    types = dict(ENGINE_SECTIONS)
    for name, sub in getattr(task_cls, "sections", {}).items():
        base = ENGINE_SECTIONS.get(name)
        if base is not None and not issubclass(sub, base):
            raise TypeError(f"task {task_cls.__name__}: section {name!r} must extend {base.__name__}")
        types[name] = sub
    return types


def _suggest(key: str, fields, section: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f"{key} (did you mean {section}.{close[0]}?)" if close else key


def _flatten(d: Dict[str, Any], name: str, prefix: str = "") -> Dict[str, Any]:
    """``{"vision": {"depth": 3}}`` -> ``{"vision.depth": 3}`` (a nested mapping must not replace a
    whole config section)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if not v:
                raise ConfigError(f"{name}.{key} is an empty mapping")
            out.update(_flatten(v, name, key + "."))
        else:
            out[key] = v
    return out


def _coerce(v: Any, typ: str, name: str) -> Any:
    """YAML reads ``2e-3`` as a string (YAML 1.1); convert by the field's declared type."""
    try:
        if v is None:
            if "Optional" not in typ:
                raise ConfigError(f"{name} must not be empty")
            return v
        if typ.startswith("Tuple"):
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{name} must be a list, got {v!r}")
            return tuple(float(x) for x in v)
        if ("float" in typ or "int" in typ) and isinstance(v, bool):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        if "float" in typ:
            return float(v)
        if "int" in typ:
            f = float(v) if isinstance(v, (str, float)) else v
            if isinstance(f, float):
                if not f.is_integer():
                    raise ConfigError(f"{name} must be an integer, got {v!r}")
                return int(f)
            if not isinstance(f, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
            return f
        if typ == "bool":
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
                return v.lower() in ("true", "yes", "1")
            if not isinstance(v, bool):
                raise ConfigError(f"{name} must be true or false, got {v!r}")
        if typ.startswith("Dict") and not isinstance(v, dict):
            raise ConfigError(f"{name} must be a mapping, got {v!r}")
        return v
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {v!r} as {typ}") from None


def parse_override(text: str) -> Tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; values parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        val = yaml.safe_load(raw)
    except yaml.YAMLError:
        val = raw
    if isinstance(val, str):
        try:
            val = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            pass
    return key.strip(), val


def apply_overrides(d: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    d = copy.deepcopy(d)
    for text in overrides:
        key, val = parse_override(text)
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {key!r} must name a section and a key, e.g. optim.lr")
        if parts[0] == "model" and parts[1] == "overrides" and len(parts) > 2:  # model.overrides.vision.depth=4
            model = d["model"] = d.get("model") or {}
            if not isinstance(model, dict):
                raise ConfigError("recipe section 'model' must be a mapping")
            ov = model.get("overrides") or {}
            if not isinstance(ov, dict):
                raise ConfigError(f"model.overrides must be a mapping, got {ov!r}")
            ov = model["overrides"] = _flatten(ov, "model.overrides")
            ov[".".join(parts[2:])] = val
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {key!r}: recipes have two levels (section.key)")
        d[parts[0]] = d.get(parts[0]) or {}
        if not isinstance(d[parts[0]], dict):
            raise ConfigError(f"override {key!r}: {parts[0]} is not a section")
        d[parts[0]][parts[1]] = val
    return d


def load_recipe(path: str, overrides: Sequence[str] = (), default_task: Optional[str] = None) -> Recipe:
    """Read a YAML recipe, apply ``section.key=value`` overrides and validate. ``default_task``:
    the task of a recipe without a ``task:`` key (default: ``qlip``)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(d).__name__}")
    if default_task is not None:
        d.setdefault("task", default_task)
    return Recipe.from_dict(apply_overrides(d, overrides))


def recipe_to_yaml(recipe: Recipe) -> str:
    d = recipe.to_dict()
    for sec in d.values():
        if isinstance(sec, dict):
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
    return yaml.safe_dump(d, sort_keys=False)


def list_fields(task: str = DEFAULT_TASK) -> List[str]:
    """Every ``section.key`` a recipe of ``task`` accepts."""
    from .tasks import get_task
    return [f"{name}.{g.name}" for name, sub in section_types(get_task(task)).items()
            for g in dataclasses.fields(sub)]
