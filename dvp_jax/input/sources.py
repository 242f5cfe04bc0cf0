"""Where examples come from: ``get_source(input_config)`` dispatches on ``input_config.source``.

Every source yields the same elements, in a fixed order, for one process's shard of a split:

  {'image': uint8 [H, W, 3] (decoded RGB; H, W may vary for folder and tfds sources),
   'label': int32 [] (class index into ``SplitInfo.class_names``),
   'index': int64 [] (the example's position in the whole split, 0 <= index < num_examples)}

Split names ('train', 'train+val', 'train[:10%]') and shards (process ``p`` of ``P`` gets a
contiguous block): ``dvp_jax.input.splits``.

Kinds of source (``dvp_jax.input.source_base``):
  * ``IndexedSource`` (digits, synthetic, folder, tfds subsets): element ``i`` of a split can be
    loaded on its own (``element_fn``), so the train pipeline shuffles the whole split cheaply by
    permuting indices, and resumes by skipping indices before any decoding.
  * ``Source`` (tfds): streams TFDS records; the train pipeline shuffles each process's shard in
    a seeded buffer and skips still-encoded records on resume.

One module per source:
  source_digits    -- 'digits': scikit-learn's 8x8 digits, split per class.
  source_synthetic -- 'synthetic': deterministic random images.
  source_folder    -- 'folder:PATH': ImageFolder layout, files checked (and cached), skips counted.
  source_tfds      -- 'tfds:NAME': TFDS, streamed; with ``input.tfds_train_per_class`` > 0
                      VIPriors-style per-class 'train' / 'val' subsets of the TFDS train split
                      (held encoded in memory) and the full TFDS 'test' split.
Images are decoded by ``dvp_jax.input.decode``, which refuses images whose header says more
than ``input.max_image_pixels`` pixels (decompression bombs).
"""
from __future__ import annotations

from dvp_jax.errors import DataError
from dvp_jax.input.source_base import IndexedSource, Source, SplitInfo
from dvp_jax.input.source_digits import DigitsSource
from dvp_jax.input.source_folder import FolderSource
from dvp_jax.input.source_synthetic import SyntheticSource
from dvp_jax.input.source_tfds import TfdsSource, TfdsSubsetSource

__all__ = ["IndexedSource", "Source", "SplitInfo", "get_source", "split_sizes"]

# Sources that are costly to build, kept per process: digits (loads and splits the data set),
# tfds subsets (read the TFDS train labels).
_DIGITS_CACHE: dict = {}
_TFDS_SUBSET_CACHE: dict = {}


def split_sizes(input_config) -> dict[str, int | str]:
    """{split: examples} of the config's train and eval splits as this process sees them
    (a split it cannot read maps to its error message): what multi-host runs must agree on."""
    source = get_source(input_config)
    sizes = {}
    for key in ("train_split", "eval_split"):
        split = input_config.get(key)
        if split and split not in sizes:
            try:
                sizes[split] = source.info(split).num_examples
            except DataError as e:
                sizes[split] = f"unreadable: {e}"
    return sizes


def get_source(input_config) -> Source:
    """The source named by ``input_config.source``: 'digits' | 'synthetic' | 'tfds:NAME' | 'folder:PATH'."""
    source = str(input_config.source)
    if source == "digits":
        key = (int(input_config.get("digits_image_size", 32)), int(input_config.split_seed),
               int(input_config.digits_train_per_class), int(input_config.digits_val_per_class),
               int(input_config.digits_test_per_class))
        if key not in _DIGITS_CACHE:
            _DIGITS_CACHE[key] = DigitsSource(input_config)
        return _DIGITS_CACHE[key]
    if source == "synthetic":
        return SyntheticSource(input_config)
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if int(input_config.get("tfds_train_per_class", 0) or 0) > 0:
            key = (name, str(input_config.data_dir), str(input_config.get("tfds_image_key", "image")),
                   str(input_config.get("tfds_label_key", "label")), int(input_config.split_seed),
                   int(input_config.tfds_train_per_class),
                   int(input_config.get("tfds_val_per_class", 0) or 0))
            if key not in _TFDS_SUBSET_CACHE:  # Reads the TFDS train labels once per process.
                _TFDS_SUBSET_CACHE[key] = TfdsSubsetSource(name, input_config)
            return _TFDS_SUBSET_CACHE[key]
        return TfdsSource(name, input_config)
    if source.startswith("folder:"):
        return FolderSource(source[len("folder:"):], input_config)
    raise ValueError(f"input.source={source!r}: use 'digits', 'synthetic', 'tfds:NAME' or "
                     f"'folder:PATH'.")
