"""Generation: the KV cache changes nothing (text, captions, guided drawing), each step samples only
the rows of its group, <eos> ends text."""
import numpy as np
import pytest
import torch

from _um3_utils import BITS, GRID, GROUPS, image_ids, tiny_llama
from qlip.um3.generate import Sampling, caption, continue_text, draw, generate
from qlip.um3.model import from_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    m, tok = from_llama(tiny_llama(tmp_path_factory.mktemp("g") / "tiny"), bits=BITS, groups=GROUPS)
    with torch.no_grad():  # the mean-initialised rows are all equal: make them distinct for the test
        m.lm.tok_embeddings.weight[m.vocab.text_size:].normal_(0, 0.5)
        m.lm.output.weight[m.vocab.text_size:].normal_(0, 0.5)
    return m.eval(), tok


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached(model, temperature):
    m, tok = model
    s = Sampling(temperature=temperature, top_k=50, seed=7)
    a = continue_text(m, tok, "a red", max_new=12, sampling=s, n=2)
    b = continue_text(m, tok, "a red", max_new=12, sampling=s, n=2, use_cache=False)
    assert a == b
    img = torch.from_numpy(np.stack([image_ids(1, 0), image_ids(2, 1)])).long().view(2, *GRID)
    assert caption(m, tok, img, max_new=10, sampling=s) == caption(m, tok, img, max_new=10, sampling=s, use_cache=False)
    g = Sampling(temperature=temperature, seed=3, cfg_scale=3.0)
    x = draw(m, tok, ["a blue circle", "a red square"], GRID, g)
    y = draw(m, tok, ["a blue circle", "a red square"], GRID, g, use_cache=False)
    assert torch.equal(x, y) and x.shape == (2, *GRID) and int(x.max()) < (1 << BITS)


def test_steps_sample_only_their_rows_and_stop_at_eos(model):
    m, tok = model
    v = m.vocab
    prompt = torch.tensor([[m.bos_id, v.boi]])
    vis = v.visual
    sub = generate(m, prompt, 8, lambda i: (vis.group_start(i % 2), vis.group_start(i % 2) + vis.group_size),
                   Sampling(temperature=1.0, seed=0))
    for i, r in enumerate(sub[0].tolist()):
        assert vis.group_start(i % 2) <= r < vis.group_start(i % 2) + vis.group_size
    eos = m.eos_id
    out = generate(m, torch.tensor([[m.bos_id]]), 5, lambda i: (eos, eos + 1), Sampling(temperature=1.0, seed=0),
                   stop=eos)
    assert out.tolist() == [[eos]]  # only <eos> allowed: stops after one step
    text = generate(m, torch.tensor([[m.bos_id]] * 3), 20, lambda i: (0, v.text_size), Sampling(seed=1))
    assert int(text.max()) < v.text_size


def test_guidance_scale_one_is_the_conditional_model(model):
    m, tok = model
    a = draw(m, tok, ["a blue circle"], GRID, Sampling(temperature=0.0, cfg_scale=1.0))
    ids = torch.tensor([[m.bos_id] + tok.encode("a blue circle") + [m.vocab.boi]])
    vis = m.vocab.visual
    sub = generate(m, ids, 8, lambda i: (vis.group_start(i % 2), vis.group_start(i % 2) + vis.group_size),
                   Sampling(temperature=0.0))
    assert torch.equal(a.flatten(1), vis.decode(sub))


def test_guided_captions_are_guided_against_the_text_only_model(model):
    """caption(cfg_scale=s): each word is the argmax over the text rows of
    uncond + s (cond - uncond), cond = after ``<bos> <boi> image <eoi>``, uncond = after ``<bos>`` (the
    caption so far appended to both); the cache changes nothing."""
    from qlip.nn import cfg_logits
    m, tok = model
    v = m.vocab
    img = torch.from_numpy(np.stack([image_ids(1, 0), image_ids(3, 1)])).long().view(2, *GRID)
    s = Sampling(temperature=0.0, cfg_scale=2.5)
    words = caption(m, tok, img, max_new=6, sampling=s)
    assert words == caption(m, tok, img, max_new=6, sampling=s, use_cache=False)
    assert words != caption(m, tok, img, max_new=6)  # guidance changes what this random model says
    rows = v.image_seq(img)
    cond = torch.cat([torch.tensor([[m.bos_id, v.boi]] * 2), rows, torch.full((2, 1), v.eoi)], 1)
    free = torch.tensor([[m.bos_id]] * 2)
    out = []
    with torch.no_grad():
        for _ in range(6):
            g = cfg_logits(m.next_logits(cond).float(), m.next_logits(free).float(), 2.5)[:, : v.text_size]
            t = g.argmax(-1)
            out.append(t)
            cond, free = torch.cat([cond, t[:, None]], 1), torch.cat([free, t[:, None]], 1)
    new = torch.stack(out, 1).tolist()
    expect = [tok.decode(r[: r.index(m.eos_id)] if m.eos_id in r else r) for r in new]
    assert words == expect
