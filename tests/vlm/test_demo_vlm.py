"""`qlip demo vlm --fast` end to end on stand-ins for the QLIP demo's models (tiny, 2 blocks)."""
import json
import shutil

import pytest

from qlip.errors import ConfigError


def test_demo_vlm_fast_writes_metrics_report_and_a_chat_model(tmp_path, qlip_dir):
    from qlip.demo.vlm import TYPES, checks, run_vlm_demo
    demo = tmp_path / "demo"
    shutil.copytree(qlip_dir, demo / "qlip")
    shutil.copytree(qlip_dir, demo / "recon_only" / "final")
    m = run_vlm_demo(str(demo), str(tmp_path / "out"), fast=True)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) == {"layer_-2", "last_layer", "after_quantizer", "recon_only", "checks", "settings"}
    assert saved["checks"] == checks(saved, None) and saved["settings"]["lanes"] == 1  # 1 thread: one lane
    for name in ("layer_-2", "last_layer", "after_quantizer", "recon_only"):
        assert set(saved[name]) == {"accuracy", *TYPES}
        assert all(0.0 <= v <= 1.0 for v in saved[name].values())
        assert saved[name] == m[name]
    assert "layer_-2" in (tmp_path / "out" / "report.html").read_text()
    from qlip.vlm import load
    assert load(str(tmp_path / "out" / "vlm")).config.layer == -2
    with pytest.raises(ConfigError, match="not found: run `qlip demo` first"):
        run_vlm_demo(str(tmp_path / "nowhere"), str(tmp_path / "out2"), fast=True)


def test_checks_are_the_issue_targets_and_table6_direction():
    from qlip.demo.vlm import checks

    def row(acc, colour=1.0, kind=0.5, position=1.0, size=1.0):
        return {"accuracy": acc, "colour": colour, "kind": kind, "position": position, "size": size}

    m = {"layer_-2": row(0.8, colour=0.95, position=0.90, kind=0.6), "last_layer": row(0.9),
         "after_quantizer": row(0.8), "recon_only": row(0.7)}
    assert all(checks(m, 0.6).values())
    assert checks(m, None)["layer_-2 kind >= QLIP zero-shot kind"] is None
    assert checks(m, 0.61)["layer_-2 kind >= QLIP zero-shot kind"] is False
    m["after_quantizer"] = row(0.81)
    m["layer_-2"]["colour"] = 0.94
    got = checks(m, 0.6)
    assert [k for k, v in got.items() if not v] == ["layer_-2 colour >= 0.95", "layer_-2 >= after_quantizer"]


def test_the_demo_recipe_fits_every_training_conversation_in_max_length(tmp_path):
    """The demo's multi-turn conversations (64 image tokens at 64 px) must fit ``max_length`` whole:
    with the template spelt letter by letter (merges learned on the answers only, the recipe before
    issue 16's fix) over half of them were cut and lost most of their answers."""
    from transformers import AutoTokenizer

    from qlip.demo.vlm import RECIPE, prepare
    from qlip.vlm.conversation import IGNORE_INDEX, from_llava, tokenize_conversation
    cfg = {"train_images": 120, "heldout_images": 1}
    job = prepare(str(tmp_path), cfg, RECIPE, 64)
    tok = AutoTokenizer.from_pretrained(job["llm"])
    image_id = tok.convert_tokens_to_ids("<image>")
    records = json.loads(open(job["train_json"]).read())
    assert any(len(r["qa"]) >= 4 for r in records)
    for r in records:
        ids, labels = tokenize_conversation(tok, from_llava(r["conversations"]), image_id, 64, 1 << 30)
        assert len(ids) <= RECIPE["max_length"], (r["id"], len(ids))
        # every answer is trained: one label span per assistant turn
        starts = sum(1 for j, y in enumerate(labels) if y != IGNORE_INDEX and (j == 0 or labels[j - 1] == IGNORE_INDEX))
        assert starts == len(r["qa"])


def test_merge_texts_rendered_includes_the_template_turns_do_not():
    from qlip.vlm.tiny import merge_texts
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                             {"from": "gpt", "value": "red"},
                             {"from": "human", "value": "Where is the shape?"}, {"from": "gpt", "value": "left"}]}
    (rendered,) = merge_texts([rec])
    assert rendered.count("ASSISTANT:") == 2 and "What color is the shape?" in rendered and "left" in rendered
    assert merge_texts([rec], "turns") == ["<image>\nWhat color is the shape?", "red", "Where is the shape?", "left"]
    with pytest.raises(ConfigError, match="merge texts must be one of rendered, turns"):
        merge_texts([rec], "answers")
