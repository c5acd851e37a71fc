"""The VLM's pieces: the splice, the labels, the loss, the vision tower, generation, save/load."""
import json

import pytest
import torch

from qlip.errors import ConfigError, DataError
from qlip.vlm import VLMConfig, answer_loss, build_vlm, generate, load, splice
from qlip.vlm.chat import generate_ids
from qlip.vlm.conversation import IGNORE_INDEX, tokenize_conversation


def test_splice_equals_a_hand_built_sequence():
    emb = torch.nn.Embedding(10, 3)
    IMG = 9
    ids = torch.tensor([[1, IMG, IMG, 4, 5, 0],
                        [2, 3, IMG, IMG, 6, 7]])
    feats = torch.randn(2, 2, 3)  # image k fills the k-th run of image positions
    got = splice(emb, ids, feats, IMG)
    e = emb.weight
    want = torch.stack([torch.stack([e[1], feats[0, 0], feats[0, 1], e[4], e[5], e[0]]),
                        torch.stack([e[2], e[3], feats[1, 0], feats[1, 1], e[6], e[7]])])
    assert torch.equal(got, want)
    feats.requires_grad_(True)
    splice(emb, ids, feats, IMG).sum().backward()  # the projector learns through the splice
    assert torch.equal(feats.grad, torch.ones_like(feats))
    with pytest.raises(DataError, match="4 image positions in the text but 2 image features"):
        splice(emb, ids, feats[:1], IMG)
    assert torch.equal(splice(emb, torch.tensor([[1, 2]]), None, IMG), e[[1, 2]][None])


def test_vlm_embeds_splice_projected_features(vlm):
    x = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[5, 6] + [vlm.image_token_id] * vlm.num_image_tokens + [7]])
    with torch.no_grad():
        got = vlm.embed(ids, x)
        tok = vlm.llm.get_input_embeddings().weight
        feats = vlm.projector(vlm.vision.qlip.encode_image_features(x, layer=-2))[0]
        want = torch.cat([tok[[5, 6]], feats, tok[[7]]])[None]
    assert vlm.num_image_tokens == 16 and torch.equal(got, want)


def test_labels_cover_exactly_the_answers(vlm):
    msgs = [{"role": "user", "content": "<image>\nWhat color is the shape?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Where is the shape?"}, {"role": "assistant", "content": "left"}]
    tok = vlm.tokenizer
    ids, labels = tokenize_conversation(tok, msgs, vlm.image_token_id, vlm.num_image_tokens, 512, "plain")
    assert len(ids) == len(labels)
    assert ids.count(vlm.image_token_id) == vlm.num_image_tokens
    assert all(y == IGNORE_INDEX for t, y in zip(ids, labels) if t == vlm.image_token_id)
    learned = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ids, labels))
    assert tok.decode(learned) == " red</s> left</s>"
    prompt = tok.decode([t for t, y in zip(ids, labels) if y == IGNORE_INDEX and t != vlm.image_token_id])
    assert prompt == "<s>USER: \nWhat color is the shape? ASSISTANT:USER: Where is the shape? ASSISTANT:"
    # the tokenizer's own chat template when it has one
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids, labels = tokenize_conversation(tok, msgs, vlm.image_token_id, vlm.num_image_tokens, 512, "auto")
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == "red</s>left</s>"
    ids, labels = tokenize_conversation(tok, msgs, vlm.image_token_id, vlm.num_image_tokens, 512, "plain")
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == " red</s> left</s>"
    with pytest.raises(DataError, match="would cut an image"):
        tokenize_conversation(tok, msgs, vlm.image_token_id, vlm.num_image_tokens, 8, "plain")


def test_answer_loss_is_the_mean_of_per_sample_means():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, -100, -100, 6]])

    def ce(t, y):
        return float(torch.nn.functional.cross_entropy(logits[t[0], t[1]][None], torch.tensor([y])))

    s0 = (ce((0, 1), 3) + ce((0, 2), 4)) / 2
    s1 = (ce((1, 0), 1) + ce((1, 3), 6)) / 2
    assert abs(float(answer_loss(logits, labels)) - (s0 + s1) / 2) < 1e-6
    labels[1] = -100  # a sample with nothing to learn does not count
    assert abs(float(answer_loss(logits, labels)) - s0) < 1e-6


def test_vision_tower_layers_codes_and_range(vlm, qlip_dir, llm_dir):
    x = torch.randn(2, 3, 32, 32)
    q = vlm.vision.qlip
    assert torch.equal(vlm.vision(x), q.encode_image_features(x, layer=-2))
    assert not any(p.requires_grad for p in q.parameters())
    # frozen: not in the VLM's parameters or state_dict (saved once, in vision/), but moved with it
    assert not list(vlm.vision.parameters()) and not any(k.startswith("vision") for k in vlm.state_dict())
    assert vlm.double().vision.qlip.dtype == torch.float64
    vlm.float()
    vlm.train()
    assert not vlm.vision.training and vlm.projector.training
    codes = build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(features="codes"))
    c = codes.vision(x)
    L = q.num_bits
    assert c.shape == (2, 16, L) and codes.projector[0].in_features == L
    assert torch.allclose(c.abs(), torch.full_like(c, L ** -0.5))
    bits = q.quantizer.ids_to_bits(q.tokenize(x).flatten(1))  # the codes' signs are the token bits
    assert torch.equal((c > 0).long(), bits.long())
    assert len(build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(projector="linear")).projector) == 1
    depth = q.config.vision.depth  # hidden states: 0 = embeddings, depth = last block (transformers' numbering)
    with pytest.raises(ConfigError, match=f"layer {-(depth + 2)} is out of range for a QLIP encoder with {depth} block"):
        build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(layer=-(depth + 2)))
    emb = build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(layer=-(depth + 1)))
    assert torch.equal(emb.vision(x), q.visual.embed(x)[:, 1:])


def test_cached_generation_equals_uncached(vlm, qa_dir):
    imgs = [qa_dir / "images" / "heldout-000000.png", qa_dir / "images" / "heldout-000001.png"]
    prompts = ["What color is the shape?", "Where is it?"]  # different lengths: left padding
    a = generate_ids(vlm, imgs, prompts, max_new_tokens=8)
    b = generate_ids(vlm, imgs, prompts, max_new_tokens=8, use_cache=False)
    assert a.shape[0] == 2 and torch.equal(a, b)
    one = generate_ids(vlm, imgs[1:], prompts[1:], max_new_tokens=8)  # padding changes nothing
    assert torch.equal(one[0], a[1, :one.shape[1]])
    torch.manual_seed(3)
    s1 = generate(vlm, imgs, prompts, max_new_tokens=6, do_sample=True, top_p=0.9)
    torch.manual_seed(3)
    assert generate(vlm, imgs, prompts, max_new_tokens=6, do_sample=True, top_p=0.9) == s1


def test_save_load_round_trip_and_hf_folders(vlm, tmp_path, qa_dir):
    from transformers import AutoModelForCausalLM
    import qlip
    vlm.save_pretrained(str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "qlip-vlm" and meta["num_image_tokens"] == 16 and meta["config"]["layer"] == -2
    back = load(str(tmp_path / "m"))
    ids = torch.tensor([[1, 5] + [vlm.image_token_id] * 16 + [9, 10]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(ids, None, x), vlm(ids, None, x))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "llm"))  # plain HF, no qlip involved
    assert all(torch.equal(v, vlm.llm.state_dict()[k]) for k, v in hf.state_dict().items())
    assert qlip.load(str(tmp_path / "m" / "vision")).config.vision.depth == 2


def _tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_saved_folder_stores_every_tensor_once(vlm, tmp_path):
    """One copy of every weight: the projector's in model.safetensors, the LLM's under its Hugging
    Face names in llm/model.safetensors, the frozen QLIP's in vision/."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    vlm.save_pretrained(str(tmp_path / "m"))
    stored = []
    for f in sorted((tmp_path / "m").rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            stored += [h.get_tensor(k) for k in h.keys()]
    own = list(vlm.state_dict().values()) + list(vlm.vision.qlip.state_dict().values())
    assert _tensor_bytes(stored) == _tensor_bytes(own)
    total = sum(f.stat().st_size for f in (tmp_path / "m").rglob("*") if f.is_file())
    assert total < _tensor_bytes(own) + 300_000  # + the json, tokenizer and safetensors headers
    with safe_open(str(tmp_path / "m" / "llm" / "model.safetensors"), "pt") as h:
        assert set(h.keys()) == set(vlm.llm.state_dict())  # llm/ is a plain HF folder
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as h:
        assert set(h.keys()) == set(vlm.state_dict()) - set(vlm.llm.state_dict())
    # a standalone HF copy of the LLM, and a format-1 folder (LLM and QLIP stored twice) still loads
    from qlip.vlm.model import export_llm
    export_llm(vlm, str(tmp_path / "v1" / "llm"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "v1" / "llm"))
    assert all(torch.equal(v, vlm.llm.state_dict()[k]) for k, v in hf.state_dict().items())
    import shutil
    from qlip.io import write_safetensors
    shutil.copytree(tmp_path / "m" / "vision", tmp_path / "v1" / "vision")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "v1" / "config.json").write_text(json.dumps({**meta, "format_version": 1}))
    old = {"projector." + k: v for k, v in vlm.projector.state_dict().items()}
    old.update({"llm." + k: v for k, v in vlm.llm.state_dict().items()})
    old.update({"vision.qlip." + k: v for k, v in vlm.vision.qlip.state_dict().items()})
    write_safetensors(old, str(tmp_path / "v1" / "model.safetensors"))
    back = load(str(tmp_path / "v1"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), vlm.state_dict().values()))
    # a format-2 folder (every trainable weight in the top model.safetensors, llm/ indexing ../) loads
    shutil.copytree(tmp_path / "m", tmp_path / "v2")
    (tmp_path / "v2" / "llm" / "model.safetensors").unlink()
    (tmp_path / "v2" / "config.json").write_text(json.dumps({**meta, "format_version": 2}))
    write_safetensors(dict(vlm.state_dict()), str(tmp_path / "v2" / "model.safetensors"))
    back = load(str(tmp_path / "v2"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), vlm.state_dict().values()))


def test_missing_llm_is_one_line_error(qlip_dir):
    with pytest.raises(ConfigError, match="cannot be loaded") as e:
        build_vlm(str(qlip_dir), "no-such-org/no-such-model-xyz")
    assert "\n" not in str(e.value)


def test_cli_chat_and_shapes_qa(vlm, tmp_path, qa_dir, capsys):
    import argparse
    from qlip.data.shapes_qa import QUESTIONS
    from qlip.vlm import cli
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="cmd"))
    vlm.save_pretrained(str(tmp_path / "m"))
    img = str(qa_dir / "images" / "heldout-000002.png")
    a = p.parse_args(["vlm", "chat", "--model", str(tmp_path / "m"), "--image", img, "--prompt",
                      QUESTIONS["colour"], "--max-new-tokens", "5"])
    assert a.func(a) == 0
    assert capsys.readouterr().out.strip() == generate(vlm, img, QUESTIONS["colour"], max_new_tokens=5)
    a = p.parse_args(["vlm", "shapes-qa", "--out", str(tmp_path / "qa"), "--n", "4", "--split", "heldout",
                      "--size", "32"])
    assert a.func(a) == 0
    recs = json.loads((tmp_path / "qa" / "heldout.json").read_text())
    assert len(recs) == 4 * 5  # held-out images have one shape: all five questions each
    assert {r["qa"][0]["question"] for r in recs} == set(QUESTIONS.values())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(vlm, qa_dir):
    from qlip.vlm.data import VLMLoader, VLMProcessor, read_llava_json
    batch = VLMLoader(read_llava_json(str(qa_dir / "train.json")), VLMProcessor(vlm), 3).batch(0)
    vlm.train()
    vlm.llm.requires_grad_(False)  # stage 1: only the projector learns, through the frozen LLM

    def grads():
        vlm.zero_grad(set_to_none=True)
        loss = answer_loss(vlm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), batch["labels"])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in vlm.projector.parameters()]

    l0, g0 = grads()
    from qlip.vlm.model import enable_checkpointing
    enable_checkpointing(vlm.llm)
    l1, g1 = grads()
    assert any(getattr(m, "gradient_checkpointing", False) for m in vlm.llm.modules()) and l0 == l1
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g0, g1)) and any(a.abs().sum() > 0 for a in g0)


def test_token_length_and_count_cut_measure_conversations_before_the_cut(vlm, qa_dir):
    from qlip.vlm.data import VLMProcessor, count_cut, read_llava_json
    recs = read_llava_json(str(qa_dir / "train.json"))
    proc = VLMProcessor(vlm)
    lengths = [proc.token_length(r) for r in recs]
    proc.max_length = max(lengths)
    # what training encodes when nothing is cut, image tokens included
    assert [len(proc.encode_record(r)["input_ids"]) for r in recs[:4]] == lengths[:4]
    assert min(lengths) > vlm.num_image_tokens
    assert count_cut(recs, proc) == (0, len(recs))
    proc.max_length = min(lengths)
    longer = [n > min(lengths) for n in lengths]
    assert 0 < sum(longer) < len(recs)
    assert count_cut(recs, proc) == (sum(longer), len(recs))
    assert count_cut(recs, proc, limit=5) == (sum(longer[:5]), 5)


def test_token_merge_projects_each_2x2_block_of_patches(qlip_dir, llm_dir, tmp_path):
    from qlip.vlm.projector import merge_tokens
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4x4 grid of 3-d tokens
    got = merge_tokens(x, 2)
    grid = x.reshape(2, 4, 4, 3)
    want = torch.stack([torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                                   grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
                        for i in range(2) for j in range(2)], 1)
    assert got.shape == (2, 4, 12) and torch.equal(got, want) and merge_tokens(x, 1) is x
    with pytest.raises(ConfigError, match="divisible by 3"):
        merge_tokens(x, 3)

    torch.manual_seed(0)
    m = build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(token_merge=2)).eval()
    assert m.num_image_tokens == 4 and m.projector[0].in_features == 4 * m.vision.width
    img = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[5] + [m.image_token_id] * 4 + [7]])
    with torch.no_grad():
        feats = m.projector(merge_tokens(m.vision.qlip.encode_image_features(img, layer=-2), 2))[0]
        tok = m.llm.get_input_embeddings().weight
        assert torch.equal(m.embed(ids, img), torch.cat([tok[[5]], feats, tok[[7]]])[None])
    m.save_pretrained(str(tmp_path / "m"))
    back = load(str(tmp_path / "m"))
    assert back.config.token_merge == 2 and back.num_image_tokens == 4
    with torch.no_grad():
        assert torch.equal(back(ids, None, img), m(ids, None, img))
    with pytest.raises(ConfigError, match="token_merge 3 does not divide"):
        build_vlm(str(qlip_dir), str(llm_dir), VLMConfig(token_merge=3))
    with pytest.raises(ConfigError, match="token_merge must be >= 1"):
        VLMConfig(token_merge=0).validate()
