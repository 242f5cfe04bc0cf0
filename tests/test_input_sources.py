"""Sources: digits, synthetic, folder (formats, unreadable files, layout errors), fake TFDS."""
import io
import itertools
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dvp_jax import config_base
from dvp_jax.errors import DataError
from dvp_jax.input import decode, source_digits, source_folder, sources


def _config(source="digits", **overrides):
    c = config_base.input_config(source, image_size=16)
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _elements(ds):
    return list(ds.as_numpy_iterator())


def _check_elements(elements, num_classes):
    for el in elements:
        assert el["image"].dtype == np.uint8 and el["image"].ndim == 3 and el["image"].shape[2] == 3
        assert el["label"].dtype == np.int32 and 0 <= el["label"] < num_classes
        assert el["index"].dtype == np.int64


# ---------------------------------------------------------------------------------------------
# digits

def test_digits_splits_are_disjoint_sized_and_seeded():
    c = _config(digits_train_per_class=30, digits_val_per_class=20, digits_test_per_class=10)
    src = source_digits.DigitsSource(c)
    ids = {s: src.split_ids(s) for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [300, 200, 100]
    assert not set(ids["train"]) & set(ids["val"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["val"]) & set(ids["test"])
    from sklearn.datasets import load_digits
    target = load_digits().target
    for s, per_class in (("train", 30), ("val", 20), ("test", 10)):
        assert np.bincount(target[ids[s]], minlength=10).tolist() == [per_class] * 10
    assert np.array_equal(source_digits.DigitsSource(c).split_ids("train"), ids["train"])
    c.split_seed = 1
    assert not np.array_equal(source_digits.DigitsSource(c).split_ids("train"), ids["train"])
    union = src.split_ids("train+val")
    assert np.array_equal(union, np.concatenate([ids["train"], ids["val"]]))
    assert src.info("train+val") == sources.SplitInfo(500, 10, tuple("0123456789"))


def test_digits_elements_shapes_values_and_labels():
    c = _config(digits_image_size=24, digits_train_per_class=5)
    src = sources.get_source(c)
    elements = _elements(src.dataset("train"))
    assert len(elements) == 50
    _check_elements(elements, 10)
    assert all(el["image"].shape == (24, 24, 3) for el in elements)
    assert [el["index"] for el in elements] == list(range(50))
    image = elements[0]["image"]
    assert np.array_equal(image[..., 0], image[..., 2])  # Three identical channels.
    assert max(el["image"].max() for el in elements) > 200  # 0..16 scaled to 0..255.
    from sklearn.datasets import load_digits
    target = load_digits().target
    assert [el["label"] for el in elements] == target[src.split_ids("train")].tolist()


def test_digits_refuses_too_many_per_class():
    with pytest.raises(DataError, match=r"class \d has 1\d\d images, fewer than the 400"):
        source_digits.DigitsSource(_config(digits_train_per_class=200, digits_val_per_class=100,
                                     digits_test_per_class=100))


# ---------------------------------------------------------------------------------------------
# synthetic

def test_synthetic_deterministic_and_split_dependent():
    c = _config("synthetic", synthetic_num_examples=12, synthetic_num_classes=3)
    src = sources.get_source(c)
    train = _elements(src.dataset("train"))
    again = _elements(sources.get_source(c).dataset("train"))
    val = _elements(src.dataset("val"))
    assert len(train) == len(val) == 12
    _check_elements(train, 3)
    assert all(el["image"].shape == (16, 16, 3) for el in train)
    assert [el["label"] for el in train] == [i % 3 for i in range(12)]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(train, again))
    assert not np.array_equal(train[0]["image"], val[0]["image"])
    assert src.info("train+val").num_examples == 24


@pytest.mark.parametrize("kind", ["digits", "synthetic"])
def test_shards_are_disjoint_and_cover(kind):
    src = sources.get_source(_config(kind, synthetic_num_examples=37, digits_train_per_class=7))
    n = src.info("train").num_examples
    seen = [el["index"] for p in range(3) for el in _elements(src.dataset("train", p, 3))]
    assert sorted(seen) == list(range(n)) and len(seen) == n


# ---------------------------------------------------------------------------------------------
# folder

def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
GOOD = 3  # Plain JPEGs per class and split.


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _make_folder(root, splits=("train", "val"), classes=("cat", "dog"), special=True):
    for split in splits:
        for cls in classes:
            for i in range(GOOD):
                _write(os.path.join(root, split, cls, f"{i}.jpg"), _encode(Image.fromarray(RGB), "JPEG"))
    if special:
        d = os.path.join(root, "train", "dog")
        _write(os.path.join(d, "gray.jpg"), _encode(Image.fromarray(RGB[..., 0]), "JPEG"))
        rgba = np.dstack([RGB, np.full(RGB.shape[:2], 128, np.uint8)])
        _write(os.path.join(d, "rgba.png"), _encode(Image.fromarray(rgba), "PNG"))
        _write(os.path.join(d, "cmyk.JPEG"), _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG",
                                                     quality=95))
        _write(os.path.join(d, "sixteen.png"),
               tf.io.encode_png(tf.constant(RGB.astype(np.uint16) * 257)).numpy())
        full = _encode(Image.fromarray(RGB), "JPEG")
        _write(os.path.join(d, "truncated.jpg"), full[: len(full) * 2 // 3])
        _write(os.path.join(d, "notes.jpg"), b"this is not an image at all")
        _write(os.path.join(d, "readme.txt"), b"ignored: not an image extension")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    _make_folder(root)
    return root


def test_folder_formats_become_uint8_rgb_and_bad_files_are_skipped(folder_root, caplog):
    c = _config(f"folder:{folder_root}", folder_validate="decode")
    with caplog.at_level(logging.WARNING):
        src = sources.get_source(c)
        info = src.info("train")
    assert info == sources.SplitInfo(2 * GOOD + 4, 2, ("cat", "dog"))
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 file(s)" in warnings[0]
    assert "2 undecodable" in warnings[0] and "1 unknown extension" in warnings[0]
    assert "notes.jpg" in warnings[0] and "truncated.jpg" in warnings[0]
    assert "readme.txt" in warnings[0]
    assert {r: len(v) for r, v in src.skipped("train").items()} == {
        source_folder.UNDECODABLE: 2, source_folder.UNKNOWN_EXTENSION: 1}
    elements = _elements(src.dataset("train"))
    assert len(elements) == info.num_examples
    _check_elements(elements, 2)
    paths, labels = src.files("train")
    by_name = {os.path.basename(p): el for p, el in zip(paths, elements)}
    assert [el["label"] for el in elements] == labels.tolist() == [0] * GOOD + [1] * (GOOD + 4)
    for name in ("gray.jpg", "rgba.png", "cmyk.JPEG", "sixteen.png", "0.jpg"):
        assert by_name[name]["image"].shape == (12, 10, 3), name
    gray = by_name["gray.jpg"]["image"].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1])
    assert np.array_equal(by_name["rgba.png"]["image"], RGB)  # Alpha dropped, lossless.
    assert np.array_equal(by_name["sixteen.png"]["image"], RGB)  # 16-bit -> 8-bit.
    assert np.abs(by_name["cmyk.JPEG"]["image"].astype(int) - RGB).mean() < 25  # Colours kept.
    assert src.info("val").num_examples == 2 * GOOD
    assert src.info("train+val").num_examples == 4 * GOOD + 4


def test_folder_cached_validation_writes_and_reuses_index_outside_the_data(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    _make_folder(root)
    before = sorted(os.listdir(root))
    c = _config(f"folder:{root}")  # folder_validate='cached' is the default.
    src = sources.get_source(c)
    assert src.info("train").num_examples == 2 * GOOD + 4
    assert sorted(os.listdir(root)) == before  # Nothing written into the data set.
    assert src.cache_path().startswith(os.environ["XDG_CACHE_HOME"])
    with open(src.cache_path()) as f:
        checked = json.load(f)["files"]
    assert checked[os.path.join(root, "train", "dog", "notes.jpg")][2] == source_folder.UNDECODABLE
    assert checked[os.path.join(root, "train", "cat", "0.jpg")][2] == "ok"
    assert not [n for n in os.listdir(os.path.dirname(src.cache_path())) if n.endswith(".tmp")]
    # The second start decodes nothing: every file comes from the cache.
    source_folder.FolderSource._listing_cache.clear()
    monkeypatch.setattr(source_folder, "check_image_files", lambda *a: pytest.fail("re-checked"))
    assert sources.get_source(c).info("train").num_examples == 2 * GOOD + 4


def test_folder_read_errors_are_counted_but_never_cached(tmp_path, monkeypatch):
    """A file that cannot be read this time (e.g. an NFS hiccup) is skipped now, checked again
    next start, and used once it reads; broken symlinks are counted too."""
    root = str(tmp_path / "data")
    _make_folder(root, special=False)
    flaky = os.path.join(root, "train", "cat", "0.jpg")
    os.symlink(os.path.join(root, "gone.jpg"), os.path.join(root, "train", "cat", "link.jpg"))
    real_check = source_folder.check_image_files

    def failing_once(paths, max_pixels):
        result = real_check(paths, max_pixels)
        if flaky in result:
            result[flaky] = (source_folder.READ_ERROR, -1)
        return result

    monkeypatch.setattr(source_folder, "check_image_files", failing_once)
    src = sources.get_source(_config(f"folder:{root}"))
    assert src.info("train").num_examples == 2 * GOOD - 1
    assert src.skipped("train") == {source_folder.BROKEN_LINK: [os.path.join(root, "train", "cat", "link.jpg")],
                                    source_folder.READ_ERROR: [flaky]}
    with open(src.cache_path()) as f:
        assert flaky not in json.load(f)["files"]
    monkeypatch.setattr(source_folder, "check_image_files", real_check)
    source_folder.FolderSource._listing_cache.clear()
    assert sources.get_source(_config(f"folder:{root}")).info("train").num_examples == 2 * GOOD


def _png_bomb(side: int) -> bytes:
    """A tiny PNG file of side x side black pixels (compresses ~1000:1)."""
    return _encode(Image.new("L", (side, side)), "PNG", optimize=True)


def test_decompression_bombs_are_skipped_and_counted_never_decoded(tmp_path):
    root = str(tmp_path / "data")
    _make_folder(root, special=False)
    bomb = _png_bomb(3000)  # 9 M pixels = 27 MB decoded, from a file of about 10 kB.
    assert len(bomb) < 20_000
    _write(os.path.join(root, "train", "dog", "bomb.png"), bomb)
    c = _config(f"folder:{root}", max_image_pixels=1_000_000)
    src = sources.get_source(c)
    assert src.info("train").num_examples == 2 * GOOD
    assert list(src.skipped("train")) == [source_folder.TOO_LARGE]
    with pytest.raises(DataError, match=r"bomb.png: larger than input.max_image_pixels"):
        sources.get_source(_config(f"folder:{root}", max_image_pixels=1_000_000,
                                   strict=True)).info("train")
    # The decoder itself refuses it (runtime path, e.g. folder_validate='none' or TFDS).
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels=1000000"):
        decode.decode_image_bytes(tf.constant(bomb), 1_000_000)
    # A larger cap admits it (the cache remembers pixels, not a verdict).
    source_folder.FolderSource._listing_cache.clear()
    assert sources.get_source(_config(f"folder:{root}", max_image_pixels=10_000_000)
                              ).info("train").num_examples == 2 * GOOD + 1


@pytest.mark.parametrize("fmt, kw", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}),
                                     ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80})])
def test_header_pixel_count_matches_the_image(fmt, kw):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 3), np.uint8))
    data = _encode(image, fmt, **kw)
    assert int(decode.encoded_image_pixels(tf.constant(data))) == 37 * 53
    assert int(decode.encoded_image_pixels(tf.constant(b"not an image"))) == -1


def test_folder_strict_names_the_bad_file(folder_root):
    c = _config(f"folder:{folder_root}", strict=True, folder_validate="decode")
    with pytest.raises(DataError, match=r"cannot use .*notes\.jpg: undecodable.*input\.strict=True"):
        sources.get_source(c).info("train")


def test_folder_layout_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere does not exist.*<split>/<class>"):
        sources.get_source(_config(f"folder:{missing}"))

    root = str(tmp_path / "a")
    _make_folder(root, special=False)
    src = sources.get_source(_config(f"folder:{root}", folder_validate="none"))
    with pytest.raises(DataError, match=r"split 'test' not found: .*test does not exist"):
        src.info("test")

    os.makedirs(os.path.join(root, "train", "emu"))
    os.makedirs(os.path.join(root, "val", "emu"))
    with pytest.raises(DataError, match=r"class folder .*train/emu has no image files"):
        sources.get_source(_config(f"folder:{root}", folder_validate="none")).info("train")

    root = str(tmp_path / "b")
    _make_folder(root, classes=("cat", "dog"), special=False)
    _make_folder(root, splits=("val",), classes=("cow",), special=False)
    with pytest.raises(DataError, match=r"classes of split 'val' differ.*not in train: \['cow'\]"):
        sources.get_source(_config(f"folder:{root}", folder_validate="none")).info("val")


# ---------------------------------------------------------------------------------------------
# TFDS (a tiny builder written here; no network)

class DvpFakeImages(tfds.core.GeneratorBasedBuilder):
    """30 train / 11 validation images of varying sizes, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))  # No metadata files.

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30, 0), "validation": self._generate_examples(11, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            h, w = rng.integers(8, 14, size=2)
            yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    DvpFakeImages(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_source_elements_and_shards(tfds_dir):
    c = _config("tfds:dvp_fake_images", data_dir=tfds_dir)
    src = sources.get_source(c)
    assert src.info("train") == sources.SplitInfo(30, 3, ("x", "y", "z"))
    assert src.info("val").num_examples == 11  # 'val' -> 'validation'.
    assert src.info("train[:10]+val").num_examples == 21
    elements = _elements(src.dataset("train"))
    _check_elements(elements, 3)
    assert sorted(el["index"] for el in elements) == list(range(30))
    seen = [el["index"] for p in range(2) for el in _elements(src.dataset("train+val", p, 2))]
    assert sorted(seen) == list(range(41))
    with pytest.raises(DataError, match=r"no split 'test' \(available: \['train', 'validation'\]\)"):
        src.info("test")


def test_tfds_train_stream_resumes_and_shards(tfds_dir):
    from dvp_jax.input import pipeline
    c = _config("tfds:dvp_fake_images", data_dir=tfds_dir, shuffle_buffer=8)
    kw = dict(global_batch=8, seed=1, process_count=2)
    fresh = [list(itertools.islice(pipeline.make_train_iterator(
        c, "train", "train_crop_flip", process_index=p, **kw), 5)) for p in range(2)]
    assert fresh[0][0]["image"].shape == (4, 16, 16, 3)
    epoch0 = [i for p in range(2) for b in fresh[p][:3] for i in b["index"]]
    assert len(set(epoch0)) == 24  # 3 steps of 8 distinct examples out of 30.
    assert all(set(fresh[0][s]["index"]).isdisjoint(fresh[1][s]["index"]) for s in range(5))
    resumed = next(pipeline.make_train_iterator(c, "train", "train_crop_flip", process_index=1,
                                                start_step=4, **kw))
    for key in resumed:
        assert np.array_equal(resumed[key], fresh[1][4][key]), key
    evals = [list(pipeline.make_eval_iterator(c, "val", "eval_center", global_batch=8,
                                              process_index=p, process_count=2)) for p in range(2)]
    assert [len(e) for e in evals] == [2, 2]  # ceil(11 / 8).
    real = [i for e in evals for b in e for i in b["index"][b["mask"] > 0]]
    assert sorted(real) == list(range(11))


def test_tfds_missing_dataset_messages(tmp_path):
    empty = str(tmp_path)
    with pytest.raises(DataError, match=r"'cifar10' is not prepared.*tfds build cifar10"):
        sources.get_source(_config("tfds:cifar10", data_dir=empty))
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar.*manual_dir"):
        sources.get_source(_config("tfds:imagenet2012", data_dir=empty, manual_dir="/tarballs"))
    with pytest.raises(DataError, match=r"'no_such_dataset_xyz' is unknown"):
        sources.get_source(_config("tfds:no_such_dataset_xyz", data_dir=empty))


def test_unknown_source_kind():
    with pytest.raises(ValueError, match="use 'digits', 'synthetic'"):
        sources.get_source(_config("mnist"))
