"""Data: image files, resumable image-text loaders for training, labelled evaluation sets, the
synthetic captioned-shapes dataset, token shards for the downstream models and byte-level text
corpora (see docs/data.md)."""
from .evalsets import EvalDataset, ImageFolderDataset, ShardDataset, open_dataset
from .images import IMAGE_EXTS, decode_image, expand_images, find_images, is_image_file, read_image_folder
from .pipeline import (
    ImageTransform,
    PairLoader,
    TarSource,
    ListSource,
    csv_loader,
    expand_shards,
    image_folder_loader,
    image_transform,
    read_csv_pairs,
    read_tar_samples,
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
from .text_corpus import ByteCorpusLoader, read_corpus
from .tokens import TokenLoader, TokenShardDataset, tokenize_shards
