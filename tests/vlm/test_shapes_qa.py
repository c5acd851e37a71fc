"""The shapes question-answer mode: the four verbatim questions, one-word answers from the scene."""
import json

from qlip.data.shapes import COLOR_NAMES, KINDS, POSITIONS, SIZES, make_sample
from qlip.data.shapes_qa import QUESTIONS, qa_pairs, write_shapes_qa


def test_questions_are_verbatim_and_answers_come_from_the_scene(tmp_path):
    assert QUESTIONS["colour"] == "What color is the shape?"
    assert QUESTIONS["kind"] == "What kind of shape is it?"
    assert QUESTIONS["position"] == "Where is the shape?"
    assert QUESTIONS["size"] == "How big is the shape?"
    vocab = {"colour": COLOR_NAMES, "kind": KINDS, "position": POSITIONS, "size": SIZES,
             "count": ("one", "two", "three")}
    n_single = 0
    for i in range(12):
        _, _, meta = make_sample(i, size=32, split="train")
        qa = {q["type"]: q["answer"] for q in qa_pairs(meta)}
        assert qa["count"] == ("one", "two", "three")[len(meta["shapes"]) - 1]
        if len(meta["shapes"]) == 1:
            n_single += 1
            s = meta["shapes"][0]
            assert qa == {"colour": s["color"], "kind": s["kind"], "position": s["position"], "size": s["size"],
                          "count": "one"}
        else:
            assert set(qa) == {"count"}  # the four single-shape questions are not asked of several shapes
        assert all(a in vocab[t] and " " not in a for t, a in qa.items())
    assert 0 < n_single < 12
    path = write_shapes_qa(str(tmp_path), 3, split="heldout", size=32, multi_turn=True)
    recs = json.loads(open(path).read())
    assert len(recs) == 3 and all((tmp_path / r["image"]).is_file() for r in recs)
    conv = recs[0]["conversations"]
    assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
    assert [t["from"] for t in conv] == ["human", "gpt"] * 5
    assert [t["value"] for t in conv[1::2]] == [q["answer"] for q in recs[0]["qa"]]


def test_multi_shape_fraction_caps_the_count_only_images(tmp_path):
    import pytest
    from qlip.errors import DataError
    free = json.loads(open(write_shapes_qa(str(tmp_path / "free"), 40, size=32, multi_turn=True)).read())
    capped = json.loads(open(write_shapes_qa(str(tmp_path / "cap"), 40, size=32, multi_turn=True,
                                             multi_shape_fraction=0.2)).read())
    def multi(recs):
        return sum(r["qa"][0]["type"] == "count" and len(r["qa"]) == 1 for r in recs)
    assert len(free) == len(capped) == 40  # n images written either way
    assert multi(free) > 8 and multi(capped) == 8  # 20% of 40
    assert {r["image"] for r in free} - {r["image"] for r in capped}  # multi-shape samples skipped ...
    kept = {r["image"]: r for r in free}
    assert all(kept[r["image"]] == r for r in capped if r["image"] in kept)  # ... the others unchanged
    assert len(list((tmp_path / "cap" / "images").iterdir())) == 40
    assert multi(json.loads(open(write_shapes_qa(str(tmp_path / "none"), 10, size=32, multi_turn=True,
                                                 multi_shape_fraction=0.0)).read())) == 0
    with pytest.raises(DataError, match="multi_shape_fraction must be in"):
        write_shapes_qa(str(tmp_path / "bad"), 4, multi_shape_fraction=1.5)
