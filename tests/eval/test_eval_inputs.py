"""Zero-shot inputs: class names, prompt templates, one-line errors for bad input."""
import json

import pytest

from qlip.errors import QLIPError
from qlip.eval.zeroshot import format_prompt, load_classnames, load_templates, zero_shot_classifier


def test_classnames_and_templates(tmp_path):
    assert load_classnames(None, ["golden_retriever", "cat"]) == ["golden retriever", "cat"]
    assert len(load_classnames("imagenet")) == 1000
    (tmp_path / "c.yaml").write_text("- a dog\n- a cat\n")
    assert load_classnames(str(tmp_path / "c.yaml"), ["dog", "cat"]) == ["a dog", "a cat"]
    with pytest.raises(QLIPError, match="2 class names but the data has 3"):
        load_classnames(str(tmp_path / "c.yaml"), ["dog", "cat", "cow"])
    (tmp_path / "m.json").write_text(json.dumps({"cat": "kitty", "dog": "puppy"}))
    assert load_classnames(str(tmp_path / "m.json"), ["cat", "dog"]) == ["kitty", "puppy"]
    with pytest.raises(QLIPError, match="does not match"):
        load_classnames(str(tmp_path / "m.json"), ["cat", "cow"])
    assert len(load_templates()) == 80 and format_prompt(load_templates()[0], "dog") == "a bad photo of a dog."
    assert load_templates("a {c} here") == ["a {c} here"] and format_prompt("a {c} here", "dog") == "a dog here"
    (tmp_path / "t.txt").write_text("no placeholder\n")
    with pytest.raises(QLIPError, match="placeholder"):
        load_templates(str(tmp_path / "t.txt"))


def test_zero_shot_needs_text_tower():
    class NoText:
        text = None

    with pytest.raises(QLIPError, match="no text tower"):
        zero_shot_classifier(NoText(), ["a"], ["{}"])
