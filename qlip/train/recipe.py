"""Training recipes: YAML files validated into dataclasses, with ``key=value`` overrides.

Every key is checked: an unknown or misspelt key is an error naming it, never silently ignored.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..errors import ConfigError


@dataclass
class ModelSection:
    preset: Optional[str] = "qlip-demo"      # preset name for random init
    overrides: Dict[str, Any] = field(default_factory=dict)   # dotted config keys, e.g. vision.depth
    init: Optional[str] = None               # qlip.load-able checkpoint to start from (stage 2: stage 1 output)
    init_open_clip: Optional[str] = None     # "ARCH:PRETRAINED" open_clip weights for the text tower
    init_eva_clip: Optional[str] = None      # EVA-CLIP vision tower: "EVA02-B-16:TAG" (open_clip) or "timm:NAME"
    drop_text: bool = False                  # drop the text tower (reconstruction-only runs, stage 2)
    grad_checkpointing: bool = False


@dataclass
class DataSection:
    train: Optional[str] = None              # shards (glob / brace pattern / list) or a .csv
    batch_size: int = 128                    # per rank, per optimizer step (before accumulation)
    workers: int = 0
    shuffle_buffer: int = 2000
    image_root: Optional[str] = None         # for CSV files with relative paths
    global_batches: bool = False             # every rank reads the 1-process stream of global batches
                                             # (batch_size * world_size) and keeps its slice: batches
                                             # independent of the number of ranks (costs world_size x decoding)


@dataclass
class OptimSection:
    optimizer: str = "lamb"                  # lamb (timm-equivalent, qlip.train.optim.Lamb) | adamw
    lr: float = 5e-4                         # peak lr of parameters not in a group below
    lr_visual: Optional[float] = None        # vision encoder (E_v); None -> lr
    lr_text: Optional[float] = None          # text encoder (E_t)
    lr_generator: Optional[float] = None     # bottleneck + decoder (G)
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 5.0                   # max global grad norm; 0 = off
    warmup_steps: int = 2000
    steps: int = 120000
    schedule: str = "cosine"                 # cosine | constant
    min_lr_ratio: float = 0.0


@dataclass
class LossSection:
    alpha_r: float = 1.0      # MSE reconstruction
    alpha_q: float = 1.0      # BSQ entropy/commitment loss
    alpha_a: float = 1.0      # contrastive alignment
    alpha_z: float = 0.0      # paper's commitment ||sg(Z_hat) - Z||^2 (needs decoder width == vision width)
    alpha_p: float = 0.0      # LPIPS
    alpha_g: float = 0.0      # GAN (generator side)
    alpha_s: float = 0.0      # stage 2: 1 - cos(E(x_hat), E(x)) with the frozen encoder (qlip/losses/semantic.py)
    semantic_features: str = "embedding"  # alpha_s on: embedding (pooled image embedding) | tokens (every token)
    lpips_net: str = "vgg"    # LPIPS trunk: vgg (paper) | alex | squeeze
    hard_negatives: bool = False  # score each image against a hard-negative caption ({key}.neg.txt) too
    logit_scale_max: float = 4.6052   # ln(100), clamp as CLIP does


@dataclass
class GANSection:
    kind: str = "hinge"        # hinge | non_saturating
    disc_lr: float = 1e-4
    disc_betas: Tuple[float, float] = (0.5, 0.9)
    disc_start: int = 0        # step at which the discriminator (and alpha_g) switch on
    disc_channels: int = 64
    disc_layers: int = 3
    r1_gamma: float = 0.0
    r1_every: int = 16


@dataclass
class TrainSection:
    stage: int = 1
    precision: str = "fp32"    # fp32 | bf16
    grad_accum: int = 1
    fsdp: bool = False         # shard every transformer block across ranks (FSDP2; AdamW only)
    contrastive_chunk: int = 0 # >0: gradient caching with chunks of this many samples
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    max_time_s: Optional[float] = None   # stop (and checkpoint) after this wall time
    device: Optional[str] = None
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    gan: GANSection = field(default_factory=GANSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Recipe":
        d = dict(d or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"unknown recipe sections: {', '.join(unknown)} (valid: {', '.join(sections)})")
        kw = {}
        for f in dataclasses.fields(cls):
            sub = f.default_factory().__class__
            val = d.get(f.name) or {}
            if not isinstance(val, dict):
                raise ConfigError(f"recipe section {f.name!r} must be a mapping")
            names = {g.name for g in dataclasses.fields(sub)}
            bad = sorted(set(val) - names)
            if bad:
                raise ConfigError(f"unknown keys in recipe section {f.name!r}: {', '.join(bad)}")
            types = {g.name: str(g.type) for g in dataclasses.fields(sub)}
            val = {k: _coerce(v, types[k], f"{f.name}.{k}") for k, v in val.items()}
            kw[f.name] = sub(**val)
        return cls(**kw).validate()

    def validate(self) -> "Recipe":
        o, l, t = self.optim, self.loss, self.train
        if o.optimizer not in ("lamb", "adamw"):
            raise ConfigError(f"optim.optimizer must be lamb or adamw, got {o.optimizer!r}")
        if o.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {o.schedule!r}")
        if t.stage not in (1, 2):
            raise ConfigError(f"train.stage must be 1 or 2, got {t.stage}")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
        if l.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"loss.lpips_net must be vgg, alex or squeeze, got {l.lpips_net!r}")
        if l.semantic_features not in ("embedding", "tokens"):
            raise ConfigError(f"loss.semantic_features must be embedding or tokens, got {l.semantic_features!r}")
        if self.gan.kind not in ("hinge", "non_saturating"):
            raise ConfigError(f"gan.kind must be hinge or non_saturating, got {self.gan.kind!r}")
        for name in ("alpha_r", "alpha_q", "alpha_a", "alpha_z", "alpha_p", "alpha_g", "alpha_s"):
            if getattr(l, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0")
        if t.stage == 2 and l.alpha_a > 0:
            raise ConfigError("stage 2 drops the text tower: set loss.alpha_a to 0")
        if l.alpha_s > 0 and t.stage != 2:
            raise ConfigError("loss.alpha_s (embedding consistency through the frozen encoder) is a stage-2 term: "
                              "in stage 1 the encoder is being trained; set train.stage=2 or loss.alpha_s=0")
        if l.alpha_a == 0 and l.alpha_r == l.alpha_q == l.alpha_z == l.alpha_p == l.alpha_g == 0:
            raise ConfigError("every loss weight is 0: nothing to train")
        if t.grad_accum < 1 or o.steps < 1 or self.data.batch_size < 1:
            raise ConfigError("train.grad_accum, optim.steps and data.batch_size must be >= 1")
        _check_ranges(self)
        if t.fsdp and o.optimizer != "adamw":
            raise ConfigError("train.fsdp needs optim.optimizer=adamw: timm's LAMB computes its per-parameter "
                              "trust ratio on the local shard of each weight, which would differ from unsharded LAMB")
        if t.contrastive_chunk and (l.alpha_p > 0 or l.alpha_g > 0):
            raise ConfigError("gradient caching (train.contrastive_chunk) is for stage 1 (no LPIPS/GAN)")
        return self


def _check_ranges(r: "Recipe") -> None:
    """Value ranges of every numeric key (one ConfigError naming the first bad key)."""
    o, l, g, t, d = r.optim, r.loss, r.gan, r.train, r.data
    checks = [
        ("optim.lr", o.lr, ">= 0", o.lr >= 0),
        ("optim.eps", o.eps, "> 0", o.eps > 0),
        ("optim.weight_decay", o.weight_decay, ">= 0", o.weight_decay >= 0),
        ("optim.grad_clip", o.grad_clip, ">= 0 (0 = off)", o.grad_clip >= 0),
        ("optim.warmup_steps", o.warmup_steps, ">= 0", o.warmup_steps >= 0),
        ("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]", 0 <= o.min_lr_ratio <= 1),
        ("optim.betas", list(o.betas), "two values in [0, 1)", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)),
        ("loss.logit_scale_max", l.logit_scale_max, "> 0", l.logit_scale_max > 0),
        ("gan.disc_lr", g.disc_lr, "> 0", g.disc_lr > 0),
        ("gan.disc_betas", list(g.disc_betas), "two values in [0, 1)",
         len(g.disc_betas) == 2 and all(0 <= b < 1 for b in g.disc_betas)),
        ("gan.disc_start", g.disc_start, ">= 0", g.disc_start >= 0),
        ("gan.disc_channels", g.disc_channels, ">= 1", g.disc_channels >= 1),
        ("gan.disc_layers", g.disc_layers, ">= 1", g.disc_layers >= 1),
        ("gan.r1_gamma", g.r1_gamma, ">= 0", g.r1_gamma >= 0),
        ("gan.r1_every", g.r1_every, ">= 1", g.r1_every >= 1),
        ("train.contrastive_chunk", t.contrastive_chunk, ">= 0 (0 = off)", t.contrastive_chunk >= 0),
        ("train.log_every", t.log_every, ">= 1", t.log_every >= 1),
        ("train.ckpt_every", t.ckpt_every, ">= 0 (0 = only at the end)", t.ckpt_every >= 0),
        ("train.keep_ckpts", t.keep_ckpts, ">= 0 (0 = keep all)", t.keep_ckpts >= 0),
        ("data.workers", d.workers, ">= 0", d.workers >= 0),
        ("data.shuffle_buffer", d.shuffle_buffer, ">= 0", d.shuffle_buffer >= 0),
    ]
    for name in ("lr_visual", "lr_text", "lr_generator"):
        v = getattr(o, name)
        checks.append((f"optim.{name}", v, ">= 0 (0 = frozen) or empty (= optim.lr)", v is None or v >= 0))
    if t.max_time_s is not None:
        checks.append(("train.max_time_s", t.max_time_s, "> 0 or empty", t.max_time_s > 0))
    for name, value, want, ok in checks:
        finite = all(math.isfinite(x) for x in (value if isinstance(value, list) else [value]) if x is not None)
        if not (ok and finite):
            raise ConfigError(f"{name} must be {want}, got {value!r}")
    if d.train is not None and not isinstance(d.train, (str, list)):
        raise ConfigError(f"data.train must be a path, a pattern or a list of them, got {d.train!r}")
    for name, v in (("model.preset", r.model.preset), ("model.init", r.model.init),
                    ("model.init_open_clip", r.model.init_open_clip),
                    ("model.init_eva_clip", r.model.init_eva_clip), ("train.device", t.device),
                    ("data.image_root", d.image_root)):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{name} must be a string, got {v!r}")
    r.model.overrides = _flatten(r.model.overrides, "model.overrides")


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


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Recipe:
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return Recipe.from_dict(apply_overrides(d, overrides))


def recipe_to_yaml(recipe: Recipe) -> str:
    d = recipe.to_dict()
    for sec in d.values():
        for k, v in sec.items():
            if isinstance(v, tuple):
                sec[k] = list(v)
    return yaml.safe_dump(d, sort_keys=False)


def list_fields() -> List[str]:
    return [f"{s.name}.{g.name}" for s in dataclasses.fields(Recipe)
            for g in dataclasses.fields(s.default_factory().__class__)]
