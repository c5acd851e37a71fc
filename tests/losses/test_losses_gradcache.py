import pytest
import torch

from _qlip_losses_testutils import TinyCLIP, assert_grads_close, grads, make_batch
from qlip.losses import ContrastiveLoss, grad_cache_step

ALIGN_W = 0.7


def plain_step(model, images, texts, with_recon, recon_w=3.0):
    model.zero_grad()
    if with_recon:
        emb, rec = model.visual.with_recon(images)
    else:
        emb, rec = model.visual(images), None
    closs = ContrastiveLoss()(emb, model.text(texts), model.logit_scale.exp())
    loss = ALIGN_W * closs + (recon_w * rec if rec is not None else 0.0)
    loss.backward()
    return loss.detach(), grads(model)


def cached_step(model, images, texts, chunk, with_recon, recon_w=3.0, replay_rng=True):
    model.zero_grad()

    def image_fn(x):
        if not with_recon:
            return model.visual(x)
        emb, rec = model.visual.with_recon(x)
        return emb, recon_w * rec

    out = grad_cache_step(
        image_fn, model.text, images, texts, ContrastiveLoss(), chunk,
        logit_scale=model.logit_scale.exp(), align_weight=ALIGN_W, replay_rng=replay_rng,
    )
    return out, grads(model)


@pytest.mark.parametrize("chunk", [1, 3, 4])
@pytest.mark.parametrize("with_recon", [False, True])
def test_gradcache_equals_full_batch(chunk, with_recon):
    torch.manual_seed(0)
    model = TinyCLIP()
    images, texts = make_batch(10)
    ref_loss, ref = plain_step(model, images, texts, with_recon)
    out, got = cached_step(model, images, texts, chunk, with_recon)
    assert_grads_close(got, ref, atol=1e-5)  # includes logit_scale
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)
    assert (out.image_extra_loss is not None) == with_recon
    assert out.text_extra_loss is None
    assert out.image_embeds.shape == (10, 8) and not out.image_embeds.requires_grad


@pytest.mark.parametrize("chunk", [3, 4, 64])  # 64 >= batch: the single-pass path
def test_gradcache_with_hard_negatives_equals_full_batch(chunk):
    """Hard-negative captions (extra image-to-text columns) are cached and re-forwarded like the
    texts: the gradients equal the plain full-batch step's, text tower and logit scale included."""
    torch.manual_seed(2)
    model = TinyCLIP()
    images, texts = make_batch(10, seed=4)
    negatives = make_batch(10, seed=5)[1]

    def text_fn(t):  # embedding and a per-sample text loss (kept for the texts, dropped for negatives)
        return model.text(t), 0.1 * model.text.emb(t).pow(2).mean()

    model.zero_grad()
    emb, rec = model.visual.with_recon(images)
    txt, txt_extra = text_fn(texts)
    closs = ContrastiveLoss()(emb, txt, model.logit_scale.exp(), text_negatives=model.text(negatives))
    ref_loss = ALIGN_W * closs + 3.0 * rec + txt_extra
    ref_loss.backward()
    ref = grads(model)

    model.zero_grad()
    out = grad_cache_step(
        lambda x: (lambda e, r: (e, 3.0 * r))(*model.visual.with_recon(x)),
        text_fn,
        images, texts, ContrastiveLoss(), chunk,
        logit_scale=model.logit_scale.exp(), align_weight=ALIGN_W, text_negatives=negatives,
    )
    assert_grads_close(grads(model), ref, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.contrastive_loss, closs.detach(), atol=1e-5, rtol=0)
    assert out.negative_embeds.shape == (10, 8) and not out.negative_embeds.requires_grad
    # the negatives matter: without them the text tower gets other gradients
    model.zero_grad()
    grad_cache_step(model.visual, model.text, images, texts, ContrastiveLoss(), chunk,
                    logit_scale=model.logit_scale.exp(), align_weight=ALIGN_W)
    assert not torch.allclose(grads(model)["text.emb.weight"], ref["text.emb.weight"], atol=1e-5)


def test_single_chunk_path_and_text_extra():
    torch.manual_seed(1)
    model = TinyCLIP()
    images, texts = make_batch(6, seed=3)
    ref_loss, ref = plain_step(model, images, texts, with_recon=True)
    # text tower returning (emb, None) is accepted; chunk >= batch takes the plain path
    model.zero_grad()
    out = grad_cache_step(
        lambda x: (lambda e, r: (e, 3.0 * r))(*model.visual.with_recon(x)),
        lambda t: (model.text(t), None),
        images, texts, ContrastiveLoss(), 64,
        logit_scale=model.logit_scale.exp(), align_weight=ALIGN_W,
    )
    assert_grads_close(grads(model), ref, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss)


def test_dropout_needs_rng_replay():
    """With dropout the cached step must equal a with-grad chunked forward under the same RNG."""
    model = TinyCLIP(dropout=0.5)
    images, texts = make_batch(8, seed=5)
    chunk = 3

    # reference: chunked forward WITH grad in the same order as phase 1 (images, then texts)
    torch.manual_seed(123)
    model.zero_grad()
    img = torch.cat([model.visual(c) for c in images.split(chunk)])
    txt = torch.cat([model.text(c) for c in texts.split(chunk)])
    (ALIGN_W * ContrastiveLoss()(img, txt, model.logit_scale.exp())).backward()
    ref = grads(model)
    rng_after_ref = torch.get_rng_state()

    torch.manual_seed(123)
    _, got = cached_step(model, images, texts, chunk, with_recon=False, replay_rng=True)
    assert_grads_close(got, ref, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)  # global stream as after phase 1

    torch.manual_seed(123)
    _, bad = cached_step(model, images, texts, chunk, with_recon=False, replay_rng=False)
    assert not torch.allclose(bad["visual.proj.weight"], ref["visual.proj.weight"], atol=1e-5)


def test_bad_arguments():
    model = TinyCLIP()
    images, texts = make_batch(4)
    with pytest.raises(ValueError):
        grad_cache_step(model.visual, model.text, images, texts[:3], ContrastiveLoss(), 2, logit_scale=1.0)
    with pytest.raises(ValueError):
        grad_cache_step(model.visual, model.text, images, texts, ContrastiveLoss(), 0, logit_scale=1.0)
    with pytest.raises(ValueError, match="text_negatives"):
        grad_cache_step(model.visual, model.text, images, texts, ContrastiveLoss(), 2, logit_scale=1.0,
                        text_negatives=texts[:3])
    with pytest.raises(TypeError):
        grad_cache_step(lambda x: (model.visual(x), 1.0), model.text, images, texts, ContrastiveLoss(), 2, logit_scale=1.0)
