"""Zero-shot image classification (the "0-shot Acc." column of the paper's Tables 2 and 14).

Protocol (the CLIP / open_clip one):

1. For every class c and prompt template t, the prompt ``t(c)`` is tokenised and embedded with
   the text tower; each embedding is L2-normalised.
2. The class embedding is the mean over templates of those normalised embeddings, L2-normalised
   again ("prompt ensembling"). The classifier is the (P, C) matrix of class embeddings.
3. An image is embedded with ``model.encode_image(x, normalize=True)``; its logits are
   ``image @ classifier`` (the temperature does not change the ranking); top-1 / top-5 accuracy
   count the images whose label is among the 1 / 5 highest logits.

For ImageNet-1k the class names are open_clip's ``IMAGENET_CLASSNAMES`` and the templates
open_clip's 80 ``OPENAI_IMAGENET_TEMPLATES`` (both from ``open_clip.zero_shot_metadata``), with the
class folders in sorted WordNet-id order, as in the usual ``val/n01440764/...`` layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from qlip.errors import DataError, QLIPError
from qlip.data.evalsets import Batch, EvalDataset
from qlip.eval.common import iter_limited, model_device

Template = Union[str, Callable[[str], str]]


# --------------------------------------------------------------------------- class names / prompts
def _read_list_file(path: Path):
    """Read a YAML / JSON list or mapping, or a text file with one entry per line."""
    import yaml

    if not path.is_file():
        raise QLIPError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        raise QLIPError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def load_classnames(spec: Optional[str] = None, folder_classes: Optional[Sequence[str]] = None) -> list[str]:
    """Class names in label order.

    ``spec``: ``None`` (use the folder names, ``_`` shown as spaces), ``"imagenet"`` (open_clip's
    1000 ImageNet names), ``"shapes"`` (the 32 classes of the synthetic shapes held-out split), or a ``.yaml``/``.json``/``.txt`` file holding either a list (label order)
    or a mapping ``{folder_name: class_name}``. A list must have one entry per class folder; a
    mapping must name exactly the class folders.
    """
    if spec is None:
        if not folder_classes:
            raise QLIPError("class names are needed: pass --classnames (imagenet, shapes or a file) for unnamed labels")
        return [c.replace("_", " ") for c in folder_classes]
    if spec.lower() == "imagenet":
        names = imagenet_classnames()
    elif spec.lower() == "shapes":
        from qlip.data.shapes import SHAPE_CLASSNAMES

        names = list(SHAPE_CLASSNAMES)
    else:
        data = _read_list_file(Path(spec))
        if isinstance(data, dict):
            if folder_classes is None:
                return [str(v) for v in data.values()]
            missing = [c for c in folder_classes if c not in data]
            extra = [k for k in data if k not in set(folder_classes)]
            if missing or extra:
                raise QLIPError(
                    f"{spec}: class mapping does not match the class folders "
                    f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"unknown: {extra[:3]}{'...' if len(extra) > 3 else ''})"
                )
            return [str(data[c]) for c in folder_classes]
        if not isinstance(data, list) or not all(isinstance(x, (str, int, float)) for x in data):
            raise QLIPError(f"{spec}: expected a list of class names or a {{folder: name}} mapping")
        names = [str(x) for x in data]
    if not names:
        raise QLIPError(f"{spec}: no class names")
    if folder_classes is not None and len(names) != len(folder_classes):
        raise QLIPError(f"{spec}: {len(names)} class names but the data has {len(folder_classes)} class folders")
    return names


def default_templates(classnames: Optional[str]) -> str:
    """Template set used when none is given: the 80 OpenAI templates for ImageNet, the shapes
    prompt for the shapes split, ``"a photo of a {}."`` otherwise."""
    if classnames is not None and classnames.lower() == "imagenet":
        return "openai"
    if classnames is not None and classnames.lower() == "shapes":
        from qlip.data.shapes import SHAPE_PROMPT

        return SHAPE_PROMPT
    return "a photo of a {}."


def load_templates(spec: Optional[str] = None) -> list[Template]:
    """Prompt templates: ``None``/``"openai"`` (80 OpenAI ImageNet templates), ``"simple"``
    (open_clip's short list), a file (YAML/JSON list or one per line) of strings containing ``{}``
    or ``{c}``, or one literal template such as ``"a photo of a {}."``.
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if spec is None or spec.lower() == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec.lower() == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    if "{}" in spec or "{c}" in spec:
        templates: list = [spec]
    elif not Path(spec).is_file():
        raise QLIPError(f"--templates {spec!r}: neither a file nor a template with a '{{}}' or '{{c}}' "
                        f"placeholder for the class name")
    else:
        data = _read_list_file(Path(spec))
        if not isinstance(data, list) or not data or not all(isinstance(t, str) for t in data):
            raise QLIPError(f"{spec}: expected a non-empty list of template strings")
        templates = data
    return [check_template(t) for t in templates]


def check_template(template: str) -> str:
    """Return ``template`` if it holds a class-name placeholder (``{}`` or ``{c}``), else raise:
    without one every class would get the same prompt and the same probability."""
    if "{}" not in template and "{c}" not in template:
        raise QLIPError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name "
                        f"(e.g. \"a photo of {{}}\")")
    return template


def format_prompt(template: Template, classname: str) -> str:
    """Fill a template (a callable, or a string with ``{}`` / ``{c}``) with a class name."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname).replace("{}", classname)


# --------------------------------------------------------------------------- classifier / evaluation
def require_text_tower(model) -> None:
    if getattr(model, "text", None) is None:
        raise QLIPError("this model has no text tower (model.text is None): zero-shot classification needs one")


@torch.no_grad()
def zero_shot_classifier(
    model,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    classes_per_batch: int = 50,
    progress: bool = False,
) -> torch.Tensor:
    """Prompt-ensembled class embeddings, shape (P, C), each column L2-normalised.

    Column c = normalise(mean_t normalise(encode_text(t(c)))).
    """
    require_text_tower(model)
    if not classnames:
        raise QLIPError("zero-shot classification needs at least one class name")
    if not templates:
        raise QLIPError("zero-shot classification needs at least one prompt template")
    from tqdm.auto import tqdm

    device = model_device(model)
    columns = []
    starts = range(0, len(classnames), classes_per_batch)
    for start in tqdm(starts, desc="class prompts", disable=not progress, leave=False):
        chunk = classnames[start : start + classes_per_batch]
        prompts = [format_prompt(t, c) for c in chunk for t in templates]
        tokens = model.tokenizer(prompts).to(device)
        emb = model.encode_text(tokens, normalize=True).float()
        emb = emb.reshape(len(chunk), len(templates), -1).mean(dim=1)
        columns.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(columns).T.contiguous()


@torch.no_grad()
def evaluate_zero_shot(
    model,
    batches: Iterable[Batch],
    classifier: torch.Tensor,
    *,
    topk: Sequence[int] = (1, 5),
    limit: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Top-k accuracy (a fraction in [0, 1]) of ``image @ classifier`` over ``(images, labels)`` batches.

    ``batches`` is any iterable of (normalised images (B,3,H,W), int labels (B,)). Returns
    ``{"top1": f, "top5": f, "n": images, "num_classes": C}`` (k is capped at C). Accuracies are
    fractions everywhere in qlip (JSON included); ``qlip.eval.common.format_accuracy`` prints them
    as percent.
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    num_classes = classifier.shape[1]
    kmax = min(max(topk), num_classes)
    correct = {k: 0 for k in topk}
    n = 0
    for images, labels in tqdm(iter_limited(batches, limit), desc="zero-shot", disable=not progress, leave=False):
        labels = torch.as_tensor(labels).to(device)
        if (labels < 0).any():
            raise DataError("zero-shot evaluation needs labelled images (got label -1: unlabelled data)")
        if (labels >= num_classes).any():
            raise DataError(f"label {int(labels.max())} out of range for {num_classes} class names")
        feats = model.encode_image(images.to(device), normalize=True).float()
        logits = feats @ classifier
        top = logits.topk(kmax, dim=-1).indices
        hit = top == labels[:, None]
        for k in topk:
            correct[k] += int(hit[:, : min(k, num_classes)].any(dim=-1).sum())
        n += len(labels)
    if n == 0:
        raise DataError("zero-shot evaluation got no images")
    out = {f"top{k}": correct[k] / n for k in topk}
    out.update(n=n, num_classes=num_classes)
    return out


def run_zero_shot(
    model,
    dataset: EvalDataset,
    *,
    classnames: Optional[str] = None,
    templates: Optional[str] = None,
    batch_size: int = 32,
    limit: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Zero-shot accuracy on an opened dataset (folder or shards), class names / templates as
    accepted by :func:`load_classnames` / :func:`load_templates` (default: :func:`default_templates`)."""
    require_text_tower(model)
    if not dataset.labelled:
        raise DataError(f"{dataset.describe()}: zero-shot needs class sub-folders or labelled shards")
    names = load_classnames(classnames, dataset.classes)
    temps = load_templates(templates if templates is not None else default_templates(classnames))
    classifier = zero_shot_classifier(model, names, temps, progress=progress)
    batches = dataset.batches(model.preprocess, batch_size, limit, progress=False)
    out = evaluate_zero_shot(model, batches, classifier, progress=progress)
    out["templates"] = len(temps)
    return out
