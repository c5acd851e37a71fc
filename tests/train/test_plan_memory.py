"""The peak-memory model of `qlip plan` (qlip.train.plan.memory_terms) against a real step of
qlip-tiny, counted directly (parameter / gradient / optimizer-state bytes) and traced on the CPU
allocator (qlip.train.memtrace.AllocatorTrace)."""
import pytest
import torch

from qlip.train.distributed import clip_grad_norm_
from qlip.train.memtrace import AllocatorTrace
from qlip.train.optim import build_optimizer
from qlip.train.plan import (Measurement, _NullLog, _synthetic_batch, _variant, build_task, count_parameters,
                             measure, memory_terms)
from qlip.train.recipe import Recipe


def _tiny(optimizer: str = "adamw") -> Recipe:
    return Recipe.from_dict({"model": {"preset": "qlip-tiny"}, "data": {"batch_size": 4},
                             "optim": {"optimizer": optimizer, "steps": 10, "warmup_steps": 1, "grad_clip": 1.0}})


def _no_activations(**kw) -> Measurement:
    base = dict(flops_per_sample=0.0, tower_block_flops={}, activation_bytes_per_sample=0.0,
                tower_block_activation_bytes={}, tower_block_input_bytes={}, depths={}, image_size=32, batch=2,
                precision="fp32", seconds=0.0)
    return Measurement(**{**base, **kw})


def _steps(recipe: Recipe, batch: int, n: int, trace: AllocatorTrace = None):
    """``n`` optimizer steps as the engine takes them; marks ``{i}.backward`` / ``{i}.optimizer``."""
    task, model = build_task(_variant(recipe), "cpu")
    task.train_mode(model)
    groups = task.param_groups(model)
    opt = build_optimizer(groups, recipe.optim)
    params = [p for g in groups for p in g["params"]]
    data = _synthetic_batch(model, recipe, batch)
    for i in range(n):
        opt.zero_grad(set_to_none=True)
        if trace is not None:
            trace.mark(f"{i}.backward")
        loss = task.micro_step(data, 1.0, _NullLog(), i)
        if loss is not None:
            loss.backward()
        del loss
        if trace is not None:
            trace.mark(f"{i}.optimizer")
        clip_grad_norm_(params, recipe.optim.grad_clip)
        opt.step()
        task.after_step(i)
    return model, opt, params, data


def test_allocator_trace_counts_tensor_bytes():
    with AllocatorTrace() as tr:
        x = torch.zeros(1000)                # 4,000 bytes
        tr.mark("x")
        y = x * 2                            # 8,000 live
        del y
        tr.mark("freed")
        z = torch.zeros(10, dtype=torch.float64)
    slack = 64  # a mark's own profiler handle (a few bytes)
    assert 4000 <= tr.live_at("x") <= 4000 + slack
    assert 8000 <= tr.peak("x", "freed") <= 8000 + slack
    assert 8000 <= tr.peak() <= 8000 + 2 * slack
    assert tr.live_at("freed") - tr.live_at("x") < slack
    assert z.nbytes == 80
    with pytest.raises(KeyError, match="no mark"):
        tr.live_at("missing")


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_parameter_gradient_and_optimizer_bytes_are_exact(optimizer):
    """weights, gradients, optimizer states (AdamW: 2 moments + a step scalar per tensor; timm's
    LAMB: 2 moments + a step scalar per group), inputs and the optimizer transient (two
    temporaries the size of the largest trainable tensor), against the tensors of a real step."""
    r = _tiny(optimizer)
    model, opt, params, data = _steps(r, batch=4, n=2)
    terms = memory_terms(_variant(r), _no_activations(), count_parameters(r), batch=4)
    assert terms["weights"] == sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert terms["gradients"] == sum(p.grad.nbytes for p in params)
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    states += [g["step"] for g in opt.param_groups if torch.is_tensor(g.get("step"))]  # timm LAMB: per group
    assert terms["optimizer_states"] == sum(t.nbytes for t in states)
    assert terms["inputs"] == sum(t.nbytes for t in data.values())
    assert terms["optimizer_transient"] == 2 * max(p.nbytes for p in params)


def test_peak_matches_the_traced_step():
    """The whole model against the CPU allocator's peak over two steps at batch 4, predicted from
    a measurement at batch 2: resident bytes exact, the total within 10% (activations are
    measured at another batch and extrapolated over depth; small temporaries are not modelled)."""
    r = _tiny("adamw")
    m = measure(r, batch=2)
    terms = memory_terms(_variant(r), m, count_parameters(r), batch=4)
    with AllocatorTrace() as tr:
        _steps(r, batch=4, n=2, trace=tr)
    resident = terms["weights"] + terms["optimizer_states"] + terms["inputs"]
    assert tr.live_at("1.backward") == pytest.approx(resident, abs=1024)
    assert terms["total"] == pytest.approx(tr.peak(), rel=0.10)
    # the backward phase alone (saved activations extrapolated from batch 2 + the overlap measured there)
    backward = tr.peak("1.backward", "1.optimizer") - tr.live_at("1.backward")
    assert terms["backward"] == pytest.approx(backward, rel=0.15)
    assert 0 < m.backward_overlap_bytes < terms["gradients"] + terms["activations"]
