"""VIPriors-style per-class subsets of TFDS data sets (input.tfds_train_per_class > 0), fake TFDS."""
import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from dvp_jax import config_base
from dvp_jax.errors import DataError
from dvp_jax.input import pipeline, source_tfds, sources

# Fake 'train' split: 30 images, class sizes 9 / 8 / 7 / 6, classes interleaved (in generation
# order; TFDS stores them in a hashed order, so tests map TFDS positions through _tfds_order).
GEN_LABELS = np.random.default_rng(5).permutation(np.repeat(np.arange(4), [9, 8, 7, 6]))
NUM_TEST = 7
CLASSES = ("a", "b", "c", "d")


def _image(key: int, split_code: int) -> np.ndarray:
    """uint8 [5, 4, 3] whose pixel (0, 0) encodes (split, generation key): PNG keeps it exact."""
    image = np.full((5, 4, 3), 17, np.uint8)
    image[0, 0] = (key, split_code, 99)
    return image


class _FakeBase(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))  # No metadata files.
    HELD_OUT = "test"

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(CLASSES)),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(GEN_LABELS, 0),
                self.HELD_OUT: self._generate_examples(np.arange(NUM_TEST) % 4, 1)}

    def _generate_examples(self, labels, split_code):
        for i, label in enumerate(labels):
            yield i, {"image": _image(i, split_code), "label": int(label)}


class DvpFakeSubsetImages(_FakeBase):
    """30 train images (classes of 9/8/7/6) and 7 test images."""


class DvpFakeSubsetNoTest(_FakeBase):
    """Like DvpFakeSubsetImages but the held-out split is called 'validation'."""
    HELD_OUT = "validation"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds_subsets"))
    DvpFakeSubsetImages(data_dir=path).download_and_prepare()
    DvpFakeSubsetNoTest(data_dir=path).download_and_prepare()
    return path


def _config(data_dir, name="dvp_fake_subset_images", train=3, val=2, seed=0, **overrides):
    c = config_base.input_config(f"tfds:{name}", image_size=16)
    c.data_dir = data_dir
    c.tfds_train_per_class, c.tfds_val_per_class, c.split_seed = train, val, seed
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _elements(ds):
    return list(ds.as_numpy_iterator())


def _decoded(elements, split_code):
    """The generation keys encoded in the elements' images (checks the split code too)."""
    assert all(el["image"][0, 0, 1] == split_code and el["image"][0, 0, 2] == 99
               for el in elements)
    return [int(el["image"][0, 0, 0]) for el in elements]


def _tfds_order(data_dir, split="train", name="dvp_fake_subset_images"):
    """(generation keys int [N], labels int [N]) of a TFDS split in TFDS read order."""
    plain = sources.get_source(_config(data_dir, name=name, train=0))
    elements = _elements(plain.dataset(split))
    return (np.array(_decoded(elements, 0 if split == "train" else 1)),
            np.array([el["label"] for el in elements]))


def test_per_class_counts_disjoint_and_elements_match_tfds(data_dir):
    keys, labels = _tfds_order(data_dir)
    assert np.array_equal(labels, GEN_LABELS[keys])
    src = sources.get_source(_config(data_dir))
    assert isinstance(src, source_tfds.TfdsSubsetSource)
    assert src is sources.get_source(_config(data_dir))  # Labels read once per process.
    assert src.info("train") == sources.SplitInfo(12, 4, CLASSES)
    assert src.info("val") == sources.SplitInfo(8, 4, CLASSES)
    assert src.info("train+val").num_examples == 20
    assert src.info("train[:5]+val[-2:]").num_examples == 7
    train, val = src.split_ids("train"), src.split_ids("val")
    assert np.bincount(labels[train], minlength=4).tolist() == [3] * 4
    assert np.bincount(labels[val], minlength=4).tolist() == [2] * 4
    assert not set(train) & set(val)
    assert list(train) == sorted(train) and list(val) == sorted(val)  # TFDS read order.
    for split, ids in (("train", train), ("val", val)):
        elements = _elements(src.dataset(split))
        assert all(el["image"].shape == (5, 4, 3) and el["image"].dtype == np.uint8
                   for el in elements)
        assert [el["index"] for el in elements] == list(range(len(ids)))
        assert _decoded(elements, 0) == keys[ids].tolist()
        assert [el["label"] for el in elements] == labels[ids].tolist()
    both = _elements(src.dataset("train+val"))
    assert _decoded(both, 0) == keys[train].tolist() + keys[val].tolist()
    assert [el["index"] for el in both] == list(range(20))


def test_same_seed_same_split_other_seed_differs(data_dir):
    a = source_tfds.TfdsSubsetSource("dvp_fake_subset_images", _config(data_dir, seed=3))
    b = source_tfds.TfdsSubsetSource("dvp_fake_subset_images", _config(data_dir, seed=3))
    c = source_tfds.TfdsSubsetSource("dvp_fake_subset_images", _config(data_dir, seed=4))
    for split in ("train", "val"):
        assert np.array_equal(a.split_ids(split), b.split_ids(split))
    assert not (np.array_equal(a.split_ids("train"), c.split_ids("train"))
                and np.array_equal(a.split_ids("val"), c.split_ids("val")))
    # The other seed still gives exact, disjoint per-class subsets.
    _, labels = _tfds_order(data_dir)
    assert np.bincount(labels[c.split_ids("train")], minlength=4).tolist() == [3] * 4
    assert not set(c.split_ids("train")) & set(c.split_ids("val"))


@pytest.mark.parametrize("name", ["dvp_fake_subset_images", "dvp_fake_subset_no_test"])
def test_test_split_is_the_full_tfds_held_out_split(data_dir, name):
    keys, _ = _tfds_order(data_dir, "test" if name == "dvp_fake_subset_images" else "validation",
                          name)
    assert sorted(keys) == list(range(NUM_TEST))  # The whole held-out split ...
    src = sources.get_source(_config(data_dir, name=name))
    assert src.info("test") == sources.SplitInfo(NUM_TEST, 4, CLASSES)
    streamed = _elements(src.dataset("test"))  # Streamed through TfdsSource.
    assert _decoded(streamed, 1) == keys.tolist()  # ... in TFDS order.
    assert [el["label"] for el in streamed] == [k % 4 for k in keys]
    assert [el["index"] for el in streamed] == list(range(NUM_TEST))
    # Loaded into memory (as when trained on): the same elements.
    load = src.element_fn("test[2:]")
    assert _decoded([{k: v.numpy() for k, v in load(i).items()} for i in range(NUM_TEST - 2)],
                    1) == keys[2:].tolist()
    with pytest.raises(DataError, match=r"splits 'train' and 'val'.*got 'validation'"):
        src.info("validation")


def test_too_few_images_in_a_class(data_dir):
    with pytest.raises(DataError, match=r"class 3 \('d'\) has 6 images in the TFDS 'train' split, "
                                        r"fewer than the 7 requested per class "
                                        r"\(input.tfds_train_per_class=5 \+ "
                                        r"input.tfds_val_per_class=2\)"):
        sources.get_source(_config(data_dir, train=5, val=2))


def test_two_process_shards_disjoint_and_covering(data_dir):
    src = sources.get_source(_config(data_dir))
    for split in ("train", "val", "train+val", "test", "val+test"):
        n = src.info(split).num_examples
        shards = [[el["index"] for el in _elements(src.dataset(split, p, 2))] for p in range(2)]
        assert not set(shards[0]) & set(shards[1]), split
        assert sorted(shards[0] + shards[1]) == list(range(n)), split


def test_train_iterator_shards_and_resumes(data_dir):
    c = _config(data_dir)
    kw = dict(global_batch=4, seed=1, process_count=2)
    fresh = [list(itertools.islice(pipeline.make_train_iterator(
        c, "train", "eval_center", process_index=p, **kw), 4)) for p in range(2)]
    epoch0 = [i for p in range(2) for b in fresh[p][:3] for i in b["index"]]
    assert sorted(epoch0) == list(range(12))  # 3 steps of 4 cover the 12 train images.
    resumed = next(pipeline.make_train_iterator(c, "train", "eval_center", process_index=1,
                                                start_step=3, **kw))
    for key in resumed:
        assert np.array_equal(resumed[key], fresh[1][3][key]), key


def test_zero_per_class_keeps_plain_tfds_and_config_keys(data_dir):
    assert config_base.input_config().tfds_train_per_class == 0
    plain = sources.get_source(_config(data_dir, train=0))
    assert type(plain) is source_tfds.TfdsSource
    assert plain.info("train").num_examples == len(GEN_LABELS)
    from configs import table1 as module
    config = module.get_config("cifar10")
    assert config.input.source == "tfds:cifar10"
    assert (config.input.tfds_train_per_class, config.input.tfds_val_per_class) == (50, 50)
    assert (config.input.train_split, config.input.eval_split) == ("train", "val")
    assert tuple(config.eval_splits) == ("val", "test")


def test_startup_reads_labels_only_and_keeps_one_copy_of_the_images(data_dir, monkeypatch):
    """Labels come without decoding an image; the encoded images live once, in Python (not
    also as a tf.constant and inside the serialized tf.data graph)."""
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded while reading labels")

    with monkeypatch.context() as m:
        m.setattr(tfds.features.Image, "decode_example", no_decoding)
        src = source_tfds.TfdsSubsetSource("dvp_fake_subset_images", _config(data_dir, seed=11))
    assert src.info("train").num_examples == 12
    ds = src.dataset("train")
    elements = _elements(ds)
    assert len(elements) == 12 and elements[0]["image"].shape == (5, 4, 3)
    graph = ds._as_serialized_graph().numpy()
    encoded = src._encoded["train"]
    assert len(encoded) == 12 and not any(bytes(e) in graph for e in encoded)
