"""``qlip plan``: what a QLIP recipe costs before a cluster is rented (docs/scaling.md).

The cost model has two measured inputs (and one measured memory term, the backward overlap,
below) and a handful of stated assumptions:

* **FLOPs per sample** (forward + backward of the recipe's real training step, losses included)
  are counted with ``torch.utils.flop_counter.FlopCounterMode`` on this machine's CPU. To keep
  L-14 at 392 px cheap, the step is run with each transformer tower at depth 1 and at depth 2
  (the blocks of a tower are identical): ``full = base + sum_t (D_t - 1) * per_block_t``. The
  counter counts matrix products, convolutions and attention (what dominates; the CPU attention
  kernel with torch's SDPA formula, see ``_cpu_attention_flops``); element-wise work is not
  counted.
* **Activation memory per sample**: bytes of the tensors autograd saves for the backward pass
  (``saved_tensors_hooks``, one count per storage, parameters excluded), measured in the same
  runs at ``batch`` samples and divided by it (everything but the contrastive logits is linear
  in the batch), extrapolated over depth like the FLOPs. Measured in fp32 (see ``_variant``).

Adjustments that are *modelled*, not measured (the measurement runs without them):
gradient checkpointing keeps only each block's input (measured with a forward pre-hook) plus one
block's activations during its recompute, and adds one forward of every block (taken as 1/3 of
its forward + backward FLOPs); gradient caching (``train.contrastive_chunk``) holds the
activations of one chunk and adds a no-grad forward of the vision encoder and text tower (1/3 of
their forward + backward FLOPs).

Peak memory per device (:func:`memory_terms`; checked against the CPU allocator's measured peak
by ``benchmarks/plan_check.py``, docs/scaling.md) is the peak of a training step in its steady
state (optimizer states exist), the larger of its two phases on top of what lives all step::

    resident  = weights (fp32 parameters + buffers) + optimizer states + the input batch
    backward  = saved activations + autocast copies (bf16) + backward overlap
    optimizer = gradients + optimizer transient
    peak      = resident + max(backward, optimizer) + device overhead

*saved activations* are measured (above); *backward overlap* is what the forward/backward peak
holds beyond them (parameter gradients already written, the loss's and the backward's
temporaries), measured once by the CPU allocator trace in the depth-1 run at ``batch`` samples and
used as is for other batches and depths (the one calibration; with gradient accumulation or
chunks it is the full gradients, which exist from the first backward on); the *optimizer
transient* is derived from the update code: the single-tensor AdamW / LAMB update holds two
temporaries the size of the parameter it updates (``sqrt(v)`` and its quotient, or the
denominator and the update), the multi-tensor (foreach, CUDA's default) AdamW one list of the
largest group's size, LAMB two; *autocast copies* are the bf16 casts of the linear and
convolution parameters that autocast caches for the step (2 bytes each). With ``train.fsdp``
the transformer blocks' weights, gradients and states are divided by the world size (the
all-gathered units are not modelled). The device overhead (CUDA context, allocator
fragmentation, ``OVERHEAD_GIB``) is assumed.

Step time = FLOPs of a device's step / (peak bf16 FLOP/s x MFU); data loading and communication
are assumed hidden (MFU is the knob that absorbs them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..errors import ConfigError
from .recipe import Recipe

OVERHEAD_GIB = 1.5      # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation (assumed)
DEFAULT_MFU = 0.40      # model FLOPs utilisation assumed for the time estimate
TOWERS = ("vision", "decoder", "text")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16_flops: float   # dense bf16 tensor-core peak, FLOP/s (vendor data sheets, no sparsity)
    memory_gib: float


GPUS: Dict[str, GPU] = {
    "h200": GPU("NVIDIA H200 SXM", 989e12, 141.0),
    "h100": GPU("NVIDIA H100 SXM", 989e12, 80.0),
    "a100": GPU("NVIDIA A100 SXM 80GB", 312e12, 80.0),
}


@dataclass
class Measurement:
    """What was measured on this machine for one recipe (per sample, full depth)."""
    flops_per_sample: float                    # forward + backward, plain step (no ckpt / chunks)
    tower_block_flops: Dict[str, float]        # per sample, one block of each tower
    activation_bytes_per_sample: float         # plain step
    tower_block_activation_bytes: Dict[str, float]
    tower_block_input_bytes: Dict[str, float]  # per sample: what checkpointing keeps per block
    depths: Dict[str, int]
    image_size: int
    batch: int                                 # samples per measurement run
    precision: str
    seconds: float                             # wall time of the measurement
    backward_overlap_bytes: float = 0.0        # forward/backward peak beyond the saved activations
                                               # (depth-1 run, ``batch`` samples; 0: not traced)


# ---- building the recipe's task ---------------------------------------------------------------
def _variant(recipe: Recipe, depths: Optional[Dict[str, int]] = None, **train) -> Recipe:
    """The recipe as measured: preset weights (no checkpoint / EVA / open_clip loading), one
    process on the CPU in fp32 (bf16 autocast on a CPU is many times slower; for B-16 the bytes
    saved under CPU bf16 autocast were 0.93x the fp32 bytes, so fp32 over-estimates a bf16 run's
    activations by <10%), optional tower depths, no checkpointing and no gradient caching."""
    d = recipe.to_dict()
    m = d["model"]
    m["init"] = m["init_eva_clip"] = m["init_open_clip"] = None
    m["grad_checkpointing"] = False
    m["overrides"] = dict(m.get("overrides") or {})
    for tower, depth in (depths or {}).items():
        m["overrides"][f"{tower}.depth"] = depth
    d["train"].update(device="cpu", fsdp=False, contrastive_chunk=0, precision="fp32", **train)
    if "lpips_backbone" in d["loss"]:
        d["loss"]["lpips_backbone"] = "random"  # same shapes and FLOPs as the real trunk
    return Recipe.from_dict(d)


@contextlib.contextmanager
def _random_lpips_trunk():
    """Build LPIPS with a random trunk: the same shapes and FLOPs as the VGG weights it would load,
    which a dry run or a plan on a machine without them does not need."""
    from .. import losses
    original = losses.PerceptualLoss
    losses.PerceptualLoss = functools.partial(original, backbone="random")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-trunk warning and meta-device copy no-ops
            yield
    finally:
        losses.PerceptualLoss = original


def build_task(recipe: Recipe, device: str = "cpu"):
    """The recipe's task and model on ``device`` (``"meta"``: shapes only, no memory, no weights)."""
    from .distributed import DistInfo
    from .tasks import get_task
    dev = torch.device(device)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=dev, comm_device=dev)
    with torch.device(dev), _random_lpips_trunk():
        task = get_task(recipe.task)(recipe, dist)
        model = task.build_model()
    task.model = model
    return task, model


def model_depths(model) -> Dict[str, int]:
    cfg = model.config
    return {t: getattr(cfg, t).depth for t in TOWERS
            if getattr(model, "visual" if t == "vision" else t, None) is not None}


class _NullLog:
    def add(self, terms, weight) -> None:  # the measurement needs no loss values
        pass


def _synthetic_batch(model, recipe: Recipe, n: int) -> Dict[str, torch.Tensor]:
    size = model.image_size
    batch = {"images": torch.randn(n, 3, size, size)}
    if model.text is not None:
        t = model.config.text
        batch["tokens"] = torch.randint(1, t.vocab_size, (n, t.context_length))
        if recipe.loss.hard_negatives:
            batch["neg_tokens"] = torch.randint(1, t.vocab_size, (n, t.context_length))
    return batch


def _cpu_attention_flops() -> Dict[Any, Any]:
    """FLOP formulas for the CPU flash-attention kernels behind ``F.scaled_dot_product_attention``,
    which ``FlopCounterMode`` does not know (it counts 0 for them; torch 2.14): torch's own SDPA
    formulas (forward 4*B*H*Tq*Tk*d, backward 2.5x that) applied to the CPU ops."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    fwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd_op is None or bwd_op is None or not hasattr(fc, "sdpa_flop_count"):
        return {}

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)
    return {fwd_op: fwd, bwd_op: bwd}


def measure_step(recipe: Recipe, batch: int = 2, trace_memory: bool = False) -> Dict[str, Any]:
    """One training micro-step of the recipe's task on the CPU, counted: FLOPs (forward +
    backward), bytes saved for backward, and per tower the bytes of one block's input. With
    ``trace_memory`` also ``fwd_bwd_peak_bytes``: the CPU allocator's peak during the forward and
    backward above what was live before it (:class:`~qlip.train.memtrace.AllocatorTrace`)."""
    from torch.utils.flop_counter import FlopCounterMode
    from .memtrace import AllocatorTrace
    task, model = build_task(recipe, "cpu")
    task.train_mode(model)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    for extra in (task.lpips, getattr(task.adv, "discriminator", None)) if hasattr(task, "lpips") else ():
        if extra is not None:
            params |= {p.untyped_storage()._cdata for p in extra.parameters()}
    seen, saved = set(), [0]

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        if s._cdata not in params and s._cdata not in seen:
            seen.add(s._cdata)
            saved[0] += s.nbytes()
        return t

    inputs: Dict[str, int] = {}
    hooks = []
    for tower in TOWERS:
        mod = getattr(model, "visual" if tower == "vision" else tower, None)
        if mod is None:
            continue
        blk = mod.transformer.blocks[0]

        def pre(_m, args, tower=tower):
            if torch.is_grad_enabled() and tower not in inputs:
                inputs[tower] = args[0].numel() * args[0].element_size()
        hooks.append(blk.register_forward_pre_hook(pre))
    data = _synthetic_batch(model, recipe, batch)
    step = recipe.gan.disc_start if getattr(task, "adv", None) is not None else 0  # discriminator on
    task.before_step(step)
    trace = AllocatorTrace() if trace_memory else contextlib.nullcontext()
    try:
        with trace, FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = task.micro_step(data, 1.0, _NullLog(), step)
            if loss is not None:
                loss.backward()
            del loss
    finally:
        for h in hooks:
            h.remove()
    out = {"flops": float(counter.get_total_flops()), "saved_bytes": float(saved[0]),
           "block_input_bytes": {k: float(v) for k, v in inputs.items()}}
    if trace_memory:  # the trace started after the model and batch were built: its 0 is the step's start
        out["fwd_bwd_peak_bytes"] = float(trace.peak())
    return out


def measure(recipe: Recipe, batch: int = 2, trace_memory: bool = True) -> Measurement:
    """FLOPs and activation bytes per sample of the recipe's step at full depth, from runs with
    every tower at depth 1 and one tower at a time at depth 2 (see the module docstring); with
    ``trace_memory`` the depth-1 run also gives the backward overlap."""
    t0 = time.time()
    _, meta = build_task(_variant(recipe), "meta")
    depths = model_depths(meta)
    ones = {t: 1 for t in depths}
    base = measure_step(_variant(recipe, ones), batch, trace_memory=trace_memory)
    block_flops, block_act = {}, {}
    for t in depths:
        two = measure_step(_variant(recipe, {**ones, t: 2}), batch)
        block_flops[t] = (two["flops"] - base["flops"]) / batch
        block_act[t] = (two["saved_bytes"] - base["saved_bytes"]) / batch
    flops = base["flops"] / batch + sum((depths[t] - 1) * block_flops[t] for t in depths)
    act = base["saved_bytes"] / batch + sum((depths[t] - 1) * block_act[t] for t in depths)
    return Measurement(flops_per_sample=flops, tower_block_flops=block_flops, activation_bytes_per_sample=act,
                       tower_block_activation_bytes=block_act,
                       tower_block_input_bytes={t: v / batch for t, v in base["block_input_bytes"].items()},
                       depths=depths, image_size=meta.image_size, batch=batch,
                       precision="fp32", seconds=time.time() - t0,
                       backward_overlap_bytes=max(0.0, base.get("fwd_bwd_peak_bytes", base["saved_bytes"])
                                                  - base["saved_bytes"]))


def load_measurement(path: str, recipe: Recipe) -> Measurement:
    """The measurement stored in a ``qlip plan --json`` file; its model must be the recipe's
    (same tower depths and image size)."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            m = Measurement(**json.load(f)["measurement"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--measured {path}: not a `qlip plan --json` file ({e.__class__.__name__}: {e})") from None
    _, meta = build_task(_variant(recipe), "meta")
    if model_depths(meta) != m.depths or meta.image_size != m.image_size:
        raise ConfigError(f"--measured {path} measured another model (depths {m.depths}, {m.image_size} px) "
                          f"than the recipe's ({model_depths(meta)}, {meta.image_size} px)")
    return m


# ---- parameters -------------------------------------------------------------------------------
# modules whose parameters autocast casts to bf16 (and keeps the casts for the step)
_AUTOCAST_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def count_parameters(recipe: Recipe, built=None) -> Dict[str, Any]:
    """Parameters of the recipe's task, built on the meta device (no memory, no weights): per
    module, trainable (in an optimizer group), inside FSDP units, and the auxiliary networks
    (LPIPS trunk, discriminator). ``built``: the ``(task, model)`` of :func:`build_task` if at hand."""
    task, model = built or build_task(_variant(recipe), "meta")
    groups = task.param_groups(model)
    trainable = {id(p) for g in groups for p in g["params"]}
    sharded = {id(p) for u in task.fsdp_units(model) for p in u.parameters()}
    per_module: Dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        per_module[top] = per_module.get(top, 0) + p.numel()
    ps = list(model.parameters())
    lpips = getattr(task, "lpips", None)
    disc = getattr(getattr(task, "adv", None), "discriminator", None)
    aux = [mod for mod in (model, lpips, disc) if mod is not None]
    train_ps = [p for p in ps if id(p) in trainable]
    cast = [p for mod in aux for sub in mod.modules() if isinstance(sub, _AUTOCAST_MODULES)
            for p in sub.parameters(recurse=False)]
    return {
        "total": sum(p.numel() for p in ps),
        "trainable": sum(p.numel() for p in ps if id(p) in trainable),
        "trainable_sharded": sum(p.numel() for p in ps if id(p) in trainable and id(p) in sharded),
        "sharded": sum(p.numel() for p in ps if id(p) in sharded),
        "per_module": per_module,
        "lpips": sum(p.numel() for p in lpips.parameters()) if lpips is not None else 0,
        "discriminator": sum(p.numel() for p in disc.parameters()) if disc is not None else 0,
        "discriminator_tensors": len(list(disc.parameters())) if disc is not None else 0,
        "buffer_bytes": sum(b.numel() * b.element_size() for mod in aux for b in mod.buffers()),
        "trainable_tensors": len(train_ps),
        "largest_trainable": max((p.numel() for p in train_ps), default=0),
        "largest_trainable_replicated": max((p.numel() for p in train_ps if id(p) not in sharded), default=0),
        "autocast_parameters": sum(p.numel() for p in cast),
        "autocast_parameters_sharded": sum(p.numel() for p in cast if id(p) in sharded),
        "input_bytes_per_sample": sum(t.numel() * t.element_size()
                                      for t in _synthetic_batch(model, recipe, 1).values()),
        "groups": [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                    "tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"])}
                   for g in groups],
    }


# ---- memory -------------------------------------------------------------------------------------
def memory_terms(recipe: Recipe, m: Measurement, params: Dict[str, Any], batch: int, live: Optional[int] = None,
                 world: int = 1, foreach: bool = False, overhead_bytes: float = 0.0) -> Dict[str, float]:
    """Bytes of each term of a training step's peak memory on one device (module docstring).

    ``batch``: samples of the micro-batch (its inputs are resident); ``live``: samples whose
    activations are alive at once (default ``batch``; a chunk with gradient caching); ``world``:
    FSDP ranks sharding the transformer blocks (1: none); ``foreach``: the multi-tensor optimizer
    update (CUDA's default without FSDP) instead of the single-tensor one (CPU, or FSDP's mixed
    DTensor lists). Autocast copies are counted when ``train.precision`` is bf16 or auto (bf16 on a GPU). Returns the terms,
    the two phases (``backward``, ``optimizer``), ``peak_phase`` (1.0: backward, 0.0: optimizer)
    and ``total``."""
    t, o = recipe.train, recipe.optim
    live = batch if live is None else live
    P, Pt = params["total"], params["trainable"]

    def shard(total: float, sharded: float) -> float:
        return (total - sharded) + sharded / world if world > 1 else total
    trainable = shard(Pt, params["trainable_sharded"])
    disc = params["discriminator"]
    # 4-byte step scalars: torch's AdamW one per tensor, timm's LAMB one per group; the
    # discriminator has its own AdamW (tasks/qlip.py)
    steps_scalars = params["trainable_tensors"] if o.optimizer == "adamw" else len(params["groups"])
    terms = {
        "weights": 4 * (shard(P, params["sharded"]) + params["lpips"] + disc) + params["buffer_bytes"],
        "optimizer_states": 8 * (trainable + disc) + 4 * (steps_scalars + params["discriminator_tensors"]),
        "inputs": params["input_bytes_per_sample"] * batch,
        "activations": m.activation_bytes_per_sample * live,
        "autocast_copies": (2 * shard(params["autocast_parameters"], params.get("autocast_parameters_sharded", 0))
                            if t.precision in ("bf16", "auto") else 0.0),
        "gradients": 4 * (trainable + disc),
    }
    accumulating = t.grad_accum > 1 or live < batch  # the gradients exist in full from the first backward on
    terms["backward_overlap"] = terms["gradients"] if accumulating else m.backward_overlap_bytes
    if foreach:  # one (AdamW) or two (LAMB) temporaries per tensor of the largest parameter group
        largest_group = max((g["parameters"] for g in params["groups"]), default=0)
        terms["optimizer_transient"] = (4 if o.optimizer == "adamw" else 8) * largest_group
    else:  # two temporaries the size of the largest (shard of a) parameter
        largest = max(params["largest_trainable_replicated"], params["largest_trainable"] / world) \
            if world > 1 else params["largest_trainable"]
        terms["optimizer_transient"] = 8 * largest
    terms["overhead"] = float(overhead_bytes)
    backward = terms["activations"] + terms["autocast_copies"] + terms["backward_overlap"]
    optimizer = terms["gradients"] + terms["optimizer_transient"]
    resident = terms["weights"] + terms["optimizer_states"] + terms["inputs"]
    terms.update(backward=backward, optimizer=optimizer, peak_phase=float(backward >= optimizer),
                 total=resident + max(backward, optimizer) + terms["overhead"])
    return terms


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    recipe: str
    gpu: str
    gpus_per_node: int
    nodes: int
    world_size: int
    mfu: float
    per_rank_batch: int
    grad_accum: int
    global_batch: int
    steps: int
    samples_seen: int
    parameters: Dict[str, Any]
    flops_per_sample: float
    activation_bytes_per_sample: float
    activation_samples: int            # samples whose activations are alive at once (micro-batch or chunk)
    memory_gib: Dict[str, float]       # the terms of memory_terms, in GiB; peak_phase: 1 backward, 0 optimizer
    device_memory_gib: float
    fits: bool
    step_seconds: float
    total_days: float
    gpu_hours: float
    notes: List[str] = field(default_factory=list)
    measurement: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def make_plan(recipe: Recipe, m: Measurement, params: Dict[str, Any], gpu: str = "h100", gpus: int = 8,
              nodes: int = 1, mfu: float = DEFAULT_MFU, name: str = "") -> Plan:
    """Combine the measurement, the parameter counts and the recipe into a per-device plan."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
    if gpus < 1 or nodes < 1:
        raise ConfigError("--gpus and --nodes must be >= 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    g, t, d, o = GPUS[gpu], recipe.train, recipe.data, recipe.optim
    world = gpus * nodes
    notes: List[str] = []
    flops = m.flops_per_sample
    act = m.activation_bytes_per_sample
    chunk = getattr(t, "contrastive_chunk", 0)
    live = min(d.batch_size, chunk) if chunk > 0 else d.batch_size
    ckpt = bool(recipe.model.grad_checkpointing)
    # towers that keep activations (a frozen encoder runs without a graph: nothing to checkpoint)
    blocks = {tw: m.depths[tw] for tw in m.tower_block_flops if m.tower_block_activation_bytes[tw] > 0}
    if ckpt:
        flops += sum(blocks[tw] * m.tower_block_flops[tw] for tw in blocks) / 3
        act -= sum(blocks[tw] * (m.tower_block_activation_bytes[tw] - m.tower_block_input_bytes.get(tw, 0.0))
                   for tw in blocks)
        act += max(m.tower_block_activation_bytes.values(), default=0.0)
        notes.append("gradient checkpointing: +1 forward of every block (1/3 of its fwd+bwd FLOPs); "
                     "activations = block inputs + one block's recompute (modelled)")
    if chunk > 0:
        flops += sum(blocks[tw] * m.tower_block_flops[tw] for tw in ("vision", "text") if tw in blocks) / 3
        notes.append(f"gradient caching: activations of {live} samples at a time, +1 no-grad forward of the "
                     "vision encoder and text tower (modelled)")
    # weights / grads / optimizer states (fp32), FSDP shards the transformer blocks
    fsdp = bool(t.fsdp) and world > 1
    P = params["total"]
    frac = params["sharded"] / P if P else 0.0
    gib = 1024 ** 3
    mm = dataclasses.replace(m, activation_bytes_per_sample=act)
    # the engine's optimizer: multi-tensor on CUDA, single-tensor with FSDP (engine.build_optimizer)
    terms = memory_terms(recipe, mm, params, batch=d.batch_size, live=live, world=world if fsdp else 1,
                         foreach=not fsdp, overhead_bytes=OVERHEAD_GIB * gib)
    mem = {k: (v if k == "peak_phase" else v / gib) for k, v in terms.items()}
    if fsdp:
        notes.append(f"FSDP over {world} ranks: {frac:.0%} of the parameters (transformer blocks) sharded")
    elif t.fsdp:
        notes.append("train.fsdp has no effect in one process")
    step_flops = flops * d.batch_size * t.grad_accum
    step_s = step_flops / (g.peak_bf16_flops * mfu)
    total_s = step_s * o.steps
    if t.precision == "fp32":  # "auto" is bf16 on the GPUs planned for
        notes.append("train.precision is fp32: the bf16 peak overstates the speed (TF32 at best)")
    fits = mem["total"] <= g.memory_gib
    if not fits:
        notes.append(f"does not fit one {g.name} ({g.memory_gib:.0f} GiB): lower data.batch_size and raise "
                     "train.grad_accum, or set train.contrastive_chunk / model.grad_checkpointing / train.fsdp")
    gb = d.batch_size * world * t.grad_accum
    return Plan(recipe=name, gpu=g.name, gpus_per_node=gpus, nodes=nodes, world_size=world, mfu=mfu,
                per_rank_batch=d.batch_size, grad_accum=t.grad_accum, global_batch=gb, steps=o.steps,
                samples_seen=gb * o.steps, parameters=params, flops_per_sample=flops,
                activation_bytes_per_sample=act, activation_samples=live, memory_gib=mem,
                device_memory_gib=g.memory_gib, fits=fits, step_seconds=step_s, total_days=total_s / 86400,
                gpu_hours=total_s * world / 3600, notes=notes, measurement=asdict(m))


def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {p}{unit}"
    return f"{x:.0f} {unit}"


def _format_memory(g: Dict[str, float]) -> str:
    """``weights + states + inputs + max(backward, optimizer) + overhead -> total`` with the terms."""
    return (f"weights {g['weights']:.2f} + optimizer states {g['optimizer_states']:.2f} + inputs {g['inputs']:.2f}"
            f" + max(backward {g['backward']:.2f} = activations {g['activations']:.2f} + autocast copies "
            f"{g['autocast_copies']:.2f} + overlap {g['backward_overlap']:.2f}, optimizer step {g['optimizer']:.2f} "
            f"= gradients {g['gradients']:.2f} + transient {g['optimizer_transient']:.2f}) + overhead "
            f"{g['overhead']:.2f} -> {g['total']:.2f} "
            f"(peak in the {'backward' if g['peak_phase'] else 'optimizer step'})")


def format_plan(p: Plan) -> str:
    pr = p.parameters
    rows = [
        ("recipe", p.recipe),
        ("devices", f"{p.world_size} x {p.gpu} ({p.nodes} node(s) x {p.gpus_per_node})"),
        ("parameters", f"{_si(pr['total'])} (trainable {_si(pr['trainable'])}; "
                       + ", ".join(f"{k} {_si(v)}" for k, v in pr["per_module"].items()) + ")"
                       + (f"; LPIPS {_si(pr['lpips'])}" if pr["lpips"] else "")
                       + (f"; discriminator {_si(pr['discriminator'])}" if pr["discriminator"] else "")),
        ("batch", f"{p.per_rank_batch} per rank x {p.grad_accum} accumulation x {p.world_size} ranks = "
                  f"{p.global_batch:,} global"),
        ("schedule", f"{p.steps:,} steps, {p.samples_seen:,} samples seen"),
        ("FLOPs / sample", f"{_si(p.flops_per_sample, 'FLOP')} (fwd + bwd, FlopCounterMode)"),
        ("activations / sample", f"{p.activation_bytes_per_sample / 2 ** 20:.1f} MiB ({p.activation_samples} "
                                 "samples live)"),
        ("memory / device", _format_memory(p.memory_gib) + f" GiB of {p.device_memory_gib:.0f}"
                            + ("" if p.fits else "  DOES NOT FIT")),
        ("step time", f"{p.step_seconds:.2f} s at {p.mfu:.0%} MFU"),
        ("total", f"{p.total_days:.2f} days, {p.gpu_hours:,.0f} GPU-hours"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines += [f"{'optimizer groups':<{w}}  " + "; ".join(f"{g['name']} lr {g['lr']:g} wd {g['weight_decay']:g} "
                                                        f"({_si(g['parameters'])})" for g in pr["groups"])]
    lines += [f"{'note':<{w}}  {n}" for n in p.notes]
    return "\n".join(lines)
