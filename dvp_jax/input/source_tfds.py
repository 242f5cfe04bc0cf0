"""'tfds:NAME': a TensorFlow Datasets data set, streamed (``TfdsSource``) or, with
``input.tfds_train_per_class`` > 0, as VIPriors-style per-class subsets held encoded in memory
(``TfdsSubsetSource``, an ``IndexedSource``).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from dvp_jax.errors import DataError
from dvp_jax.input.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image_bytes
from dvp_jax.input.source_base import AUTOTUNE, IndexedSource, Source, SplitInfo
from dvp_jax.input.splits import parse_split, shard_bounds, slice_bounds


class TfdsSource(Source):
    """A TensorFlow Datasets data set, e.g. 'tfds:cifar10' or 'tfds:imagenet2012'.

    Reads ``input.data_dir`` (TFDS default if ''); never downloads or builds: a data set that is
    not prepared raises DataError with the command that prepares it. 'val' means 'validation'
    when the builder has no 'val' split. Process ``p`` reads its contiguous block of each part of
    the split (``tfds.core.ReadInstruction`` in absolute examples); 'index' = the block's offset in
    the split + the position in TFDS's (deterministic, unshuffled) read order. Image and label
    features: ``input.tfds_image_key`` / ``input.tfds_label_key``. With
    ``input.tfds_train_per_class`` > 0, ``get_source`` returns a ``TfdsSubsetSource`` instead.
    """

    def __init__(self, name: str, input_config):
        import tensorflow_datasets as tfds
        self._tfds = tfds
        self.name = name
        self.data_dir = input_config.data_dir or None
        self.manual_dir = input_config.manual_dir or None
        self.image_key = input_config.get("tfds_image_key", "image")
        self.label_key = input_config.get("tfds_label_key", "label")
        self.max_pixels = int(input_config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        try:
            self.builder = tfds.builder(name, data_dir=self.data_dir)
        except Exception as e:  # DatasetNotFoundError and friends.
            raise DataError(f"TFDS data set {name!r} is unknown or cannot be loaded "
                            f"(input.source='tfds:{name}'): {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if not self._prepared():
            raise DataError(self._not_prepared_message())
        features = self.builder.info.features
        for key in (self.image_key, self.label_key):
            if key not in features:
                raise DataError(f"TFDS data set {name!r} has no feature {key!r} (features: "
                                f"{list(features.keys())}); set input.tfds_image_key / "
                                f"input.tfds_label_key.")

    def _prepared(self) -> bool:
        try:
            return (tf.io.gfile.exists(os.path.join(self.builder.data_dir, "dataset_info.json"))
                    and len(self.builder.info.splits) > 0)
        except Exception:  # pylint: disable=broad-except
            return False

    def _not_prepared_message(self) -> str:
        data_dir = self.data_dir or "~/tensorflow_datasets"
        base = self.name.split(":")[0].split("/")[0]
        msg = (f"TFDS data set {self.name!r} is not prepared in data_dir {data_dir} "
               f"(looked for {self.builder.data_dir}). ")
        if base.startswith("imagenet"):
            manual = self.manual_dir or "<manual_dir>"
            return msg + (
                f"ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar into {manual} (input.manual_dir) and run "
                f"`tfds build {base} --data_dir={data_dir} --manual_dir={manual}`.")
        return msg + (f"Run `tfds build {base} --data_dir={data_dir}` (on a machine with network "
                      f"access, then copy the data_dir here) and set input.data_dir.")

    def _parts(self, split: str) -> list[tuple[str, int, int]]:
        """[(split name, start, stop)] in absolute examples, one per '+'-part."""
        splits = self.builder.info.splits
        parts = []
        for name, lo, hi in parse_split(split):
            if name not in splits and name == "val" and "validation" in splits:
                name = "validation"
            if name not in splits:
                raise DataError(f"TFDS data set {self.name!r} has no split {name!r} "
                                f"(available: {sorted(splits.keys())}).")
            start, stop = slice_bounds(splits[name].num_examples, lo, hi)
            parts.append((name, start, stop))
        return parts

    def info(self, split: str) -> SplitInfo:
        n = sum(stop - start for _, start, stop in self._parts(split))
        label = self.builder.info.features[self.label_key]
        names = tuple(getattr(label, "names", None) or ())
        num_classes = int(getattr(label, "num_classes", len(names)))
        return SplitInfo(n, num_classes, names or tuple(str(c) for c in range(num_classes)))

    def encoded_dataset(self, split: str, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
        """Like ``dataset`` but 'image' stays encoded (tf.string): cheap to skip and shuffle."""
        tfds = self._tfds
        offset, pieces = 0, []
        read_config = tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)
        for name, start, stop in self._parts(split):
            lo, hi = shard_bounds(stop - start, process_index, process_count)
            if hi > lo:
                instruction = tfds.core.ReadInstruction(name, from_=start + lo, to=start + hi,
                                                        unit="abs")
                ds = self.builder.as_dataset(
                    split=instruction, shuffle_files=False, read_config=read_config,
                    decoders={self.image_key: tfds.decode.SkipDecoding()})
                first = offset + lo
                ds = ds.enumerate(start=first).map(
                    lambda i, ex: {"image": ex[self.image_key],
                                   "label": tf.cast(ex[self.label_key], tf.int32),
                                   "index": tf.cast(i, tf.int64)})
                pieces.append(ds)
            offset += stop - start
        if not pieces:  # This process has no examples (fewer examples than processes).
            return tf.data.Dataset.from_tensor_slices(
                {"image": tf.zeros([0], tf.string), "label": tf.zeros([0], tf.int32),
                 "index": tf.zeros([0], tf.int64)})
        ds = pieces[0]
        for piece in pieces[1:]:
            ds = ds.concatenate(piece)
        return ds

    def decode(self, element: dict) -> dict:
        """Encoded element -> element with 'image' uint8 [H, W, 3] (fails over the pixel cap)."""
        return dict(element, image=decode_image_bytes(element["image"], self.max_pixels))

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        """Decoded elements; undecodable ones and images over input.max_image_pixels are dropped
        (logged by tf.data)."""
        return self.encoded_dataset(split, process_index, process_count).map(
            tf.autograph.experimental.do_not_convert(self.decode),
            num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors(log_warning=True)


class TfdsSubsetSource(IndexedSource):
    """VIPriors-style data-deficient splits of a TFDS data set ('tfds:NAME' with
    ``input.tfds_train_per_class`` > 0).

    Splits (plus TFDS-style slices and '+'-unions of them):
      * 'train' / 'val': ``tfds_train_per_class`` / ``tfds_val_per_class`` images per class,
        carved from the TFDS 'train' split, disjoint. The labels of the TFDS train split are read
        once (label feature only); for each class (in label order 0..C-1) a
        ``numpy.random.default_rng(split_seed)`` permutation of that class's TFDS positions
        gives the train images, then the val images. Each split lists its images in TFDS read
        order (positions ascending). A class with fewer than train + val images -> DataError.
      * 'test': the TFDS 'test' split in full ('validation' when the data set has no 'test',
        e.g. imagenet2012); streamed exactly like ``TfdsSource`` when read for evaluation.
    'index' is the position in the dvp_jax split (not the TFDS position; ``split_ids`` maps
    'train' / 'val' to TFDS train positions).

    This is an ``IndexedSource``: the encoded train and val images are held in memory (about
    2.5 kB per CIFAR image, ~110 kB per ImageNet JPEG: meant for subsets up to some 10^4
    images; for ImageNet-sized subsets use the VIPriors folder source,
    ``python -m dvp_jax.input.vipriors``), so the train pipeline shuffles the whole split and
    resumes by index. The encoded images are loaded on first use (a second pass over the TFDS
    train split that keeps only the chosen records); a split containing 'test' is loaded into
    memory only when it is trained on (``element_fn``).
    """

    SPLITS = ("train", "val", "test")
    may_fail_at_runtime = True  # Images over input.max_image_pixels are dropped.

    def __init__(self, name: str, input_config):
        import tensorflow_datasets as tfds
        self._tfds = tfds
        self.tfds = TfdsSource(name, input_config)
        self.name = name
        self.per_class = {"train": int(input_config.tfds_train_per_class),
                          "val": int(input_config.get("tfds_val_per_class", 0) or 0)}
        if self.per_class["train"] <= 0 or self.per_class["val"] < 0:
            raise ValueError(f"input.tfds_train_per_class={self.per_class['train']} must be > 0 "
                             f"and input.tfds_val_per_class={self.per_class['val']} >= 0.")
        self.split_seed = int(input_config.split_seed)
        splits = self.tfds.builder.info.splits
        if "train" not in splits:
            raise DataError(f"TFDS data set {name!r} has no 'train' split to carve "
                            f"input.tfds_train_per_class images per class from (available: "
                            f"{sorted(splits.keys())}).")
        self.test_name = ("test" if "test" in splits else
                          "validation" if "validation" in splits else None)
        self._class_info = self.tfds.info("train")
        labels = self._read_train_labels()
        self._split_ids, self._split_labels = self._choose(labels)
        self._encoded: dict[str, np.ndarray] = {}  # 'train' | 'val' | 'test' -> bytes [n].
        self._test_labels: np.ndarray | None = None

    # -- choosing the subsets --
    def _read_config(self):
        return self._tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)

    def _read_train_labels(self) -> np.ndarray:
        """Labels int64 [N] of the TFDS train split in read order (only the label is parsed)."""
        tfds = self._tfds
        ds = self.tfds.builder.as_dataset(
            split="train", shuffle_files=False, read_config=self._read_config(),
            decoders=tfds.decode.PartialDecoding({self.tfds.label_key: True}))
        ds = ds.map(lambda ex: tf.cast(ex[self.tfds.label_key], tf.int64)).batch(8192)
        labels = [b for b in ds.as_numpy_iterator()]
        labels = np.concatenate(labels) if labels else np.zeros([0], np.int64)
        expected = self.tfds.builder.info.splits["train"].num_examples
        if len(labels) != expected:
            raise DataError(f"TFDS data set {self.name!r}: read {len(labels)} labels from the "
                            f"'train' split, but its metadata says {expected} examples; the "
                            f"prepared data in {self.tfds.builder.data_dir} looks incomplete.")
        return labels

    def _choose(self, labels: np.ndarray) -> tuple[dict, dict]:
        num_classes = self._class_info.num_classes
        names = self._class_info.class_names
        counts = np.bincount(labels, minlength=num_classes)
        needed = self.per_class["train"] + self.per_class["val"]
        rng = np.random.default_rng(self.split_seed)
        chosen = {"train": [], "val": []}
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            if len(members) < needed:
                raise DataError(
                    f"TFDS data set {self.name!r}: class {c} ({names[c]!r}) has {len(members)} "
                    f"images in the TFDS 'train' split, fewer than the {needed} requested per "
                    f"class (input.tfds_train_per_class={self.per_class['train']} + "
                    f"input.tfds_val_per_class={self.per_class['val']}); the smallest class has "
                    f"{int(counts.min())} images.")
            members = rng.permutation(members)
            chosen["train"].append(members[:self.per_class["train"]])
            chosen["val"].append(members[self.per_class["train"]:needed])
        ids = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in chosen.items()}
        return ids, {k: labels[v].astype(np.int32) for k, v in ids.items()}

    def split_ids(self, name: str) -> np.ndarray:
        """TFDS 'train' positions int64 [n] of the images of 'train' or 'val', ascending."""
        if name not in self._split_ids:
            raise DataError(f"split_ids: use 'train' or 'val', got {name!r}.")
        return self._split_ids[name]

    # -- splits --
    def _size(self, name: str) -> int:
        if name == "test":
            return self.tfds.builder.info.splits[self.test_name].num_examples
        return len(self._split_ids[name])

    def _parts(self, split: str) -> list[tuple[str, int, int]]:
        """[(dvp_jax split name, start, stop)] in positions of that split, one per '+'-part."""
        parts = []
        for name, lo, hi in parse_split(split):
            if name not in self.SPLITS:
                raise DataError(
                    f"TFDS data set {self.name!r} with input.tfds_train_per_class > 0 has the "
                    f"splits 'train' and 'val' (carved per class from the TFDS 'train' split) and "
                    f"'test' (the TFDS {self.test_name or 'test'!r} split); got {name!r} in "
                    f"split {split!r}.")
            if name == "test" and self.test_name is None:
                raise DataError(f"TFDS data set {self.name!r} has neither a 'test' nor a "
                                f"'validation' split for 'test' (available: "
                                f"{sorted(self.tfds.builder.info.splits.keys())}).")
            start, stop = slice_bounds(self._size(name), lo, hi)
            parts.append((name, start, stop))
        return parts

    def info(self, split: str) -> SplitInfo:
        n = sum(stop - start for _, start, stop in self._parts(split))
        return dataclasses.replace(self._class_info, num_examples=n)

    # -- loading --
    def _load_train_subsets(self) -> None:
        """Reads the encoded images of 'train' and 'val' (one pass over the chosen TFDS range)."""
        ids = np.concatenate([self._split_ids["train"], self._split_ids["val"]])
        total = self.tfds.builder.info.splits["train"].num_examples
        keep = np.zeros(total, bool)
        keep[ids] = True
        first, last = int(ids.min()), int(ids.max()) + 1
        tfds = self._tfds
        ds = self.tfds.builder.as_dataset(
            split=tfds.core.ReadInstruction("train", from_=first, to=last, unit="abs"),
            shuffle_files=False, read_config=self._read_config(),
            decoders={self.tfds.image_key: tfds.decode.SkipDecoding()})
        keep_t = tf.constant(keep)
        ds = ds.enumerate(start=first).filter(lambda i, ex: tf.gather(keep_t, i)).map(
            lambda i, ex: (i, ex[self.tfds.image_key])).batch(1024)
        found = {}
        for positions, images in ds.as_numpy_iterator():
            found.update(zip(positions.tolist(), images))
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise DataError(f"TFDS data set {self.name!r}: could not read {len(missing)} chosen "
                            f"'train' records (e.g. position {missing[0]}).")
        for name in ("train", "val"):
            self._encoded[name] = np.array([found[i] for i in self._split_ids[name].tolist()],
                                           dtype=object)
        nbytes = sum(len(b) for b in found.values())
        logging.info("tfds:%s subsets: %d train + %d val images (%.1f MB encoded) in memory.",
                     self.name, len(self._encoded["train"]), len(self._encoded["val"]), nbytes / 2**20)

    def _load_test(self) -> None:
        ds = self.tfds.encoded_dataset(self.test_name).map(
            lambda el: (el["image"], el["label"])).batch(1024)
        images, labels = [], []
        for im, lab in ds.as_numpy_iterator():
            images += list(im)
            labels.append(lab)
        self._encoded["test"] = np.array(images, dtype=object)
        self._test_labels = (np.concatenate(labels) if labels else np.zeros([0])).astype(np.int32)

    def _arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(encoded images object [n], labels int32 [n]) of 'train', 'val' or 'test'."""
        if name not in self._encoded:
            if name == "test":
                self._load_test()
            else:
                self._load_train_subsets()
        labels = self._test_labels if name == "test" else self._split_labels[name]
        return self._encoded[name], labels

    def element_fn(self, split: str):
        images, labels = [], []
        for name, start, stop in self._parts(split):
            enc, lab = self._arrays(name)
            images.append(enc[start:stop])
            labels.append(lab[start:stop])
        # The encoded images stay in this one Python copy (object [n] of bytes): a tf.constant
        # would add a second copy, and a third inside the serialized tf.data graph.
        images = np.concatenate(images)
        labels = tf.constant(np.concatenate(labels).astype(np.int32))
        max_pixels = self.tfds.max_pixels

        def fetch(index):
            return images[int(index)]

        def element(index):
            data = tf.numpy_function(fetch, [index], tf.string, stateful=False)
            data.set_shape([])
            return {"image": decode_image_bytes(data, max_pixels),
                    "label": tf.gather(labels, index), "index": tf.cast(index, tf.int64)}

        return element

    def dataset(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        parts = self._parts(split)
        if all(name == "test" for name, _, _ in parts):  # Stream: no test images in memory.
            tfds_split = "+".join(f"{self.test_name}[{start}:{stop}]" for _, start, stop in parts)
            return self.tfds.dataset(tfds_split, process_index, process_count)
        return super().dataset(split, process_index, process_count)

