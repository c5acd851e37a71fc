"""Data: the synthetic captioned-shapes dataset and resumable image-text loaders (see docs/data.md)."""
from .pipeline import (
    ImageTransform,
    PairLoader,
    TarSource,
    ListSource,
    csv_loader,
    decode_image,
    expand_shards,
    image_folder_loader,
    image_transform,
    read_csv_pairs,
    read_image_folder,
    webdataset_loader,
)
from .shapes import (
    COLOR_NAMES,
    KINDS,
    POSITIONS,
    SHAPE_CLASSNAMES,
    SHAPE_PROMPT,
    SIZES,
    generate_heldout,
    generate_shapes,
    make_sample,
    read_manifest,
    shape_label,
    shape_prompts,
)
