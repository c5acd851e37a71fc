"""Image files: which extensions are images, finding them in folders, decoding them to RGB.

The one place for these three things: the CLI's image arguments (``qlip tokenize DIR``), the
training loaders (tar members, image folders) and the evaluation sets all go through here, so
an image one of them reads, the others read too.

* :data:`IMAGE_EXTS`: extensions without the dot, in the order a webdataset sample's image
  field is picked when it has several (``png`` before ``jpg``, ...).
* :func:`find_images`: image files under a folder, sorted by (folder, name), hidden files and
  folders (``.name``) skipped.
* :func:`read_image_folder`: ``root/<class>/**/<image>`` -> (path, label) pairs and class names.
* :func:`expand_images`: files, folders and globs from a command line -> image paths.
* :func:`decode_image`: bytes or a path -> fully decoded RGB PIL image (alpha composited on
  white by ``qlip.model.preprocess.to_rgb``, as ``model.preprocess`` does).
"""
from __future__ import annotations

import glob
import io
import os
from typing import List, Sequence, Tuple, Union

from PIL import Image

from ..errors import DataError
from ..model.preprocess import to_rgb

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name whose extension is one of :data:`IMAGE_EXTS` (any case)."""
    base = os.path.basename(name)
    return "." in base and not base.startswith(".") and base.rsplit(".", 1)[1].lower() in IMAGE_EXTS


def decode_image(data: Union[bytes, str, os.PathLike]) -> Image.Image:
    """Fully decode image bytes (or a file path) into an RGB PIL image; raises on any defect."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()  # decode now: truncated data fails here, not later in the transform
        return to_rgb(im)


def find_images(folder: str, recursive: bool = True) -> List[str]:
    """Image files in ``folder`` (and its sub-folders when ``recursive``), sorted by (folder, name);
    hidden files and folders are skipped."""
    if not recursive:
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if is_image_file(f) and os.path.isfile(os.path.join(folder, f))]
    found = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.append((dirpath, sorted(f for f in files if is_image_file(f))))
    return [os.path.join(dirpath, f) for dirpath, files in sorted(found) for f in files]


def read_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """((image path, label) pairs, class names) of ``root/<class>/**/<image>``.

    Classes are the non-hidden sub-folders, sorted by name (torchvision's ``ImageFolder`` and the
    ImageNet ``val/n01440764/...`` layout); a class folder without images is an error."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory")
    classnames = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classnames:
        raise DataError(f"{root}: no class sub-folders")
    items: List[Tuple[str, int]] = []
    for label, name in enumerate(classnames):
        files = find_images(os.path.join(root, name))
        if not files:
            raise DataError(f"{os.path.join(root, name)}: class folder holds no image files "
                            f"({', '.join(IMAGE_EXTS)})")
        items += [(p, label) for p in files]
    return items, classnames


def expand_images(items: Sequence[str]) -> List[str]:
    """Files, folders (recursive, see :func:`find_images`) and globs -> image paths, in argument order."""
    paths: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = find_images(item)
            if not found:
                raise DataError(f"{item}: folder contains no images ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif os.path.exists(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DataError(f"{item}: pattern matches no files")
            paths += found
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths
