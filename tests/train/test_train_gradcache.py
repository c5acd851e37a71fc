"""train.contrastive_chunk > 0 (gradient caching) gives the gradients of the plain step."""
import pytest
import torch

from _train_testutils import read_log, tiny_recipe


def _trainer(shapes_dir, out, gamma_1, **loss):
    from qlip.train.recipe import Recipe
    from qlip.train import Engine
    d = tiny_recipe(shapes_dir, model={"preset": "qlip-tiny", "overrides": {"quantizer.gamma_1": gamma_1}},
                    loss={"alpha_r": 1.0, "alpha_q": 1.0, "alpha_a": 1.0, **loss})
    return Engine(Recipe.from_dict(d), str(out))


def _grads(tr, batch, chunk):
    tr.r.train.contrastive_chunk = chunk
    tr.optimizer.zero_grad(set_to_none=True)
    from qlip.train import StepLog
    log = StepLog()
    assert tr.task.micro_step(batch, 1.0, log, tr.step) is None  # the contrastive step runs its own backward
    return {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}, log.values


def test_gradient_caching_matches_plain_step(shapes_dir, tmp_path):
    # gamma_1 = 0: the BSQ loss is a per-sample mean (commitment + per-sample entropy), exact under
    # chunking; the codebook entropy (gamma_1 > 0) is a batch statistic, computed per chunk.
    tr = _trainer(shapes_dir, tmp_path / "a", gamma_1=0.0)
    batch = next(iter(tr.loader))
    plain, logs_plain = _grads(tr, batch, 0)
    for chunk in (3, 4):  # 8 = 3 + 3 + 2 and 4 + 4
        cached, logs_cached = _grads(tr, batch, chunk)
        assert plain.keys() == cached.keys()
        assert len(plain) > 50 and any(n.startswith("text.") for n in plain) and "logit_scale" in plain
        for n in plain:
            diff = float((plain[n] - cached[n]).abs().max())
            assert diff <= 1e-5, (chunk, n, diff)
        for k in logs_plain.keys() - {"bsq_codebook_entropy"}:  # a per-chunk statistic (logged only)
            assert abs(logs_plain[k] - logs_cached[k]) <= 1e-5 * max(1.0, abs(logs_plain[k])), (k, chunk)


def test_gradient_caching_with_hard_negatives_matches_plain_step(shapes_dir, tmp_path):
    """loss.hard_negatives with train.contrastive_chunk: the hard-negative captions are cached and
    re-forwarded like the captions; the gradients equal the plain full-batch step's."""
    from qlip.errors import DataError
    from qlip.train.recipe import Recipe
    Recipe.from_dict(tiny_recipe(shapes_dir, loss={"hard_negatives": True}, train={"contrastive_chunk": 4}))
    tr = _trainer(shapes_dir, tmp_path / "hn", gamma_1=0.0, hard_negatives=True)
    batch = next(iter(tr.loader))
    assert batch["neg_tokens"].shape == batch["tokens"].shape

    # the plain full-batch step with hard negatives, written out
    tr.optimizer.zero_grad(set_to_none=True)
    from qlip.train import StepLog
    emb, extra = tr.task.image_terms(batch["images"], StepLog(), 1.0)
    txt, neg = tr.task.text_embed(batch["tokens"]), tr.task.text_embed(batch["neg_tokens"])
    closs = tr.task.contrastive(emb, txt, tr.model.logit_scale.exp(), text_negatives=neg)
    (closs + extra).backward()
    closs = float(closs.detach())
    plain = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    assert "logit_scale" in plain and any(n.startswith("text.") for n in plain)

    for chunk in (0, 3, 4):  # 0: no caching; 8 = 3 + 3 + 2 and 4 + 4
        cached, logs = _grads(tr, batch, chunk)
        assert plain.keys() == cached.keys()
        for n in plain:
            diff = float((plain[n] - cached[n]).abs().max())
            assert diff <= 1e-5, (chunk, n, diff)
        assert abs(logs["contrastive"] - closs) <= 1e-5, chunk
    tr.r.loss.hard_negatives = False  # the negatives matter
    without, _ = _grads(tr, batch, 4)
    assert float((without["text.token_embed.weight"] - plain["text.token_embed.weight"]).abs().max()) > 1e-5
    tr.r.loss.hard_negatives = True
    with pytest.raises(DataError, match="neg.txt"):
        _grads(tr, {k: v for k, v in batch.items() if k != "neg_tokens"}, 4)


def test_codebook_entropy_of_the_whole_batch_under_caching(shapes_dir, tmp_path):
    """gamma_1 > 0: the BSQ codebook entropy is a statistic of the whole batch. Phase 1 sums the
    chunks' soft code distributions and phase 2 uses that whole-batch distribution
    (BinarySphericalQuantizer.codebook_reference): the cached step equals the plain one, the
    logged codebook entropy included."""
    tr = _trainer(shapes_dir, tmp_path / "b", gamma_1=1.0)
    batch = next(iter(tr.loader))
    plain, logs_plain = _grads(tr, batch, 0)
    down = "bottleneck.down.fc.weight"
    for chunk in (3, 4):
        cached, logs_cached = _grads(tr, batch, chunk)
        assert plain.keys() == cached.keys()
        for n in plain:
            diff = float((plain[n] - cached[n]).abs().max())
            assert diff <= 1e-5, (chunk, n, diff)
        for k in logs_plain:
            assert abs(logs_plain[k] - logs_cached[k]) <= 1e-5 * max(1.0, abs(logs_plain[k])), (k, chunk)
    # the term matters: the per-chunk entropy (what caching without the reference would give) differs
    q = tr.model.quantizer
    u = torch.randn(8, q.embed_dim)
    whole = q.entropy_terms(u)[1]
    per_chunk = (q.entropy_terms(u[:4])[1] + q.entropy_terms(u[4:])[1]) / 2
    assert abs(float(whole - per_chunk)) > 1e-3
    with q.codebook_reference(q.code_distribution_sum(u)[0] / 8):
        assert abs(float(q.entropy_terms(u[:4])[1] - whole)) < 1e-6
    assert plain[down].abs().max() > 0


def test_training_run_with_gradient_caching(shapes_dir, tmp_path):
    from qlip.train.recipe import Recipe
    from qlip.train import train
    logs = []
    for chunk in (0, 3):
        d = tiny_recipe(shapes_dir, model={"preset": "qlip-tiny", "overrides": {"quantizer.gamma_1": 0.0}},
                        optim={"steps": 3}, train={"contrastive_chunk": chunk, "ckpt_every": 0})
        train(Recipe.from_dict(d), str(tmp_path / f"c{chunk}"))
        logs.append(read_log(tmp_path / f"c{chunk}"))
    for a, b in zip(*logs):
        for k in ("loss", "mse", "contrastive", "quant", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    assert torch.isfinite(torch.tensor(logs[1][-1]["loss"]))
