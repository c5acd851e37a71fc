"""The independent shape judge: >= 99% colour and kind on original held-out shapes, at 64 and 32 px."""
import numpy as np
import pytest
import torch

from qlip.data import shapes as S
from qlip.eval.shape_judge import judge_accuracy, judge_shapes, labels_to_names


def heldout(n, size, seed):
    imgs, labels, metas = [], [], []
    for i in range(n):
        img, _, m = S.make_sample(i, size=size, seed=seed, split="heldout")
        imgs.append(torch.tensor(np.asarray(img)).permute(2, 0, 1).float() / 255)
        labels.append(m["label"])
        metas.append(m["shapes"][0])
    return torch.stack(imgs), torch.tensor(labels), metas


@pytest.mark.parametrize("size,n", [(64, 192), (32, 160)])
def test_judge_reads_original_shapes(size, n):
    x, y, metas = heldout(n, size, seed=11)
    judged = judge_shapes(x)
    acc = judge_accuracy(x, y, judged=judged)
    assert acc["n"] == n and acc["colour"] >= 0.99 and acc["kind"] >= 0.99, acc
    assert np.mean([j["position"] == m["position"] for j, m in zip(judged, metas)]) >= 0.97
    assert np.mean([j["size"] == m["size"] for j, m in zip(judged, metas)]) >= 0.97


def test_judge_fails_on_images_without_the_shape():
    x, y, _ = heldout(32, 64, seed=5)
    # a blurred blob keeps the colour but not the kind: the judge must see that
    blob = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (6, 6, 6, 6), mode="replicate"), 13, stride=1)
    acc = judge_accuracy(blob, y)
    assert acc["kind"] < 0.6 and acc["colour"] >= 0.8, acc
    # labels of other images (held-out labels cycle through the 32 classes: colour * 4 + kind)
    acc = judge_accuracy(x, y.roll(4))  # previous colour, same kind
    assert (acc["colour"], acc["kind"], acc["both"]) == (0.0, 1.0, 0.0)
    acc = judge_accuracy(x, y.roll(1))  # other kind (same colour for 3 images in 4)
    assert acc["kind"] == 0.0 and acc["colour"] == 0.75


def test_judge_outputs_and_errors():
    x, y, _ = heldout(4, 64, seed=1)
    out = judge_shapes(x)
    assert [set(d) for d in out] == [{"colour", "kind", "position", "size"}] * 4
    assert labels_to_names([0, 5, 31]) == [("red", "circle"), ("green", "square"), ("black", "star")]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        judge_shapes(x[:, :1])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        judge_accuracy(x, y[:3])
