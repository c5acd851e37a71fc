"""Two gloo processes on CPU give the single-process global-batch loss and gradients."""

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _qlip_losses_testutils import TinyCLIP, assert_grads_close, grads, make_batch
from qlip.losses import ContrastiveLoss, grad_cache_step
from qlip.nn.collectives import all_reduce_gradients_

ATOL = 1e-6


def _global_mean(x):
    t = x.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _reference(model, images, texts, recon_w=0.0, negatives=None):
    ref = copy.deepcopy(model)
    ref.zero_grad()
    if recon_w:
        emb, rec = ref.visual.with_recon(images)
    else:
        emb, rec = ref.visual(images), 0.0
    neg = None if negatives is None else ref.text(negatives)
    loss = ContrastiveLoss(distributed=False)(emb, ref.text(texts), ref.logit_scale.exp(), text_negatives=neg)
    loss = loss + recon_w * rec
    loss.backward()
    return loss.detach(), grads(ref)


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        model = TinyCLIP().double()

        # 1) plain distributed loss, equal (4 + 4) and unequal (3 + 5) local batches
        for sizes in ((4, 4), (3, 5)):
            images, texts = make_batch(sum(sizes), seed=1, dtype=torch.float64)
            ref_loss, ref_grads = _reference(model, images, texts)
            start = sum(sizes[:rank])
            sl = slice(start, start + sizes[rank])
            model.zero_grad()
            loss = ContrastiveLoss()(model.visual(images[sl]), model.text(texts[sl]), model.logit_scale.exp())
            loss.backward()
            all_reduce_gradients_(model.parameters())
            torch.testing.assert_close(_global_mean(loss), ref_loss, atol=ATOL, rtol=0)
            assert_grads_close(grads(model), ref_grads, atol=ATOL)

        # 2) gradient caching across ranks, with an extra reconstruction loss (chunks of 3 over 6),
        #    without and with hard-negative captions (gathered, cached and re-forwarded too)
        images, texts = make_batch(12, seed=2, dtype=torch.float64)
        negatives = make_batch(12, seed=3)[1]
        sl = slice(6 * rank, 6 * rank + 6)

        def image_fn(x):
            emb, rec = model.visual.with_recon(x)
            return emb, 2.0 * rec

        for negs in (None, negatives):
            ref_loss, ref_grads = _reference(model, images, texts, recon_w=2.0, negatives=negs)
            model.zero_grad()
            out = grad_cache_step(
                image_fn, model.text, images[sl], texts[sl], ContrastiveLoss(), 3, logit_scale=model.logit_scale.exp(),
                text_negatives=None if negs is None else negs[sl],
            )
            all_reduce_gradients_(model.parameters())
            torch.testing.assert_close(_global_mean(out.loss), ref_loss, atol=ATOL, rtol=0)
            assert_grads_close(grads(model), ref_grads, atol=ATOL)
        # both ranks done before either tears the group down: on Python 3.9 + torch 2.4 a rank whose
        # partner had already left hung in destroy_process_group (2 runs in 3)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)
