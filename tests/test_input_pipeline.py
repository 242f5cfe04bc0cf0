"""Train/eval iterators: process shards, determinism, bitwise resume, eval padding."""
import itertools
import os

import numpy as np
import pytest

from dvp_jax import config_base
from dvp_jax.input import pipeline

B = 20  # Global batch.


def _config(source="digits", **overrides):
    c = config_base.input_config(source, image_size=12)
    c.digits_image_size = 16
    c.digits_train_per_class = 7  # 70 train examples: 3 steps of 20 per epoch, 10 dropped.
    c.digits_val_per_class = 5  # 50 val examples.
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _train(config, transform="moco_v2", **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.make_train_iterator(config, "train", transform, global_batch=B, seed=3, **kw)


def test_steps_per_epoch():
    assert pipeline.steps_per_epoch(70, 20) == 3
    assert pipeline.steps_per_epoch(20, 20) == 1
    with pytest.raises(ValueError, match="fewer than one global batch of 32; lower batch_size"):
        pipeline.steps_per_epoch(31, 32)


def test_train_batches_shapes_epochs_and_determinism():
    c = _config()
    batches = _take(_train(c, transform="train_crop_flip"), 6)
    b = batches[0]
    assert b["image"].shape == (B, 12, 12, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    epoch0 = np.concatenate([x["index"] for x in batches[:3]])
    epoch1 = np.concatenate([x["index"] for x in batches[3:]])
    assert len(set(epoch0)) == len(epoch0) == 60 and len(set(epoch1)) == 60
    assert set(epoch0) <= set(range(70))
    assert not np.array_equal(epoch0, epoch1)  # Reshuffled each epoch.
    assert sorted(epoch0) != list(range(60))  # Shuffled, not in split order.
    again = _take(_train(c, transform="train_crop_flip"), 2)
    for x, y in zip(batches, again):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other = _take(pipeline.make_train_iterator(c, "train", "train_crop_flip", global_batch=B,
                                               seed=4, process_index=0, process_count=1), 1)
    assert not np.array_equal(batches[0]["index"], other[0]["index"])


def test_train_dataset_is_deterministic_without_the_autotuner():
    """The autotuner's thread made destroying a train iterator wait up to a minute."""
    ds = pipeline.make_train_dataset(_config(), "train", "moco_v2", global_batch=B, seed=3,
                                     process_index=0, process_count=1)
    options = ds.options()
    assert options.deterministic is True
    assert options.autotune.enabled is False


def _assert_same_batches(expected, got):
    assert set(expected) == set(got)
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key


def test_resume_is_bitwise_moco():
    # 3 steps per epoch: step 4 is the second step of the second epoch.
    c = _config()
    fresh = _take(_train(c), 6)
    resumed = _take(_train(c, start_step=4), 2)
    assert resumed[0]["view1"].shape == (B, 12, 12, 3)
    _assert_same_batches(fresh[4], resumed[0])
    _assert_same_batches(fresh[5], resumed[1])


def test_resume_is_bitwise_within_an_epoch():
    c = _config()
    fresh = _take(_train(c, transform="train_crop_flip"), 3)
    resumed = _take(_train(c, transform="train_crop_flip", start_step=2), 1)
    _assert_same_batches(fresh[2], resumed[0])


def test_two_processes_split_each_global_batch():
    c = _config()
    single = _take(_train(c, transform="train_crop_flip"), 3)
    parts = [_take(_train(c, transform="train_crop_flip", process_index=p, process_count=2), 3)
             for p in range(2)]
    seen = []
    for step in range(3):
        p0, p1 = parts[0][step], parts[1][step]
        assert p0["image"].shape == (B // 2, 12, 12, 3)
        assert not set(p0["index"]) & set(p1["index"])
        # The global batch does not depend on the process count, images included.
        assert np.array_equal(np.concatenate([p0["index"], p1["index"]]), single[step]["index"])
        assert np.array_equal(np.concatenate([p0["image"], p1["image"]]), single[step]["image"])
        seen += list(p0["index"]) + list(p1["index"])
    assert len(set(seen)) == 60


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_masks_count_each_example_once(process_count):
    c = _config()
    batches = [list(pipeline.make_eval_iterator(c, "val", "eval_center", global_batch=B,
                                                process_index=p, process_count=process_count))
               for p in range(process_count)]
    assert all(len(per_process) == 3 for per_process in batches)  # ceil(50 / 20).
    real = []
    for per_process in batches:
        for b in per_process:
            assert b["image"].shape == (B // process_count, 12, 12, 3)
            assert b["mask"].dtype == np.float32
            mask = b["mask"].astype(bool)
            assert not mask[np.argmin(mask):].any() if not mask.all() else True  # Pads at the end.
            assert (b["index"][~mask] == -1).all() and (b["label"][~mask] == -1).all()
            assert (b["image"][~mask] == 0).all()
            real += list(b["index"][mask])
    assert sum(b["mask"].sum() for per_process in batches for b in per_process) == 50
    assert sorted(real) == list(range(50))


def test_eval_pads_whole_batches_for_a_short_shard():
    # 3 examples over 2 processes with global batch 4: 1 batch each, process 1 holds 2 real rows.
    c = _config("synthetic", synthetic_num_examples=3)
    b0, = pipeline.make_eval_iterator(c, "val", "ten_crop", global_batch=4, process_index=0,
                                      process_count=2)
    b1, = pipeline.make_eval_iterator(c, "val", "ten_crop", global_batch=4, process_index=1,
                                      process_count=2)
    assert b0["image"].shape == (2, 10, 12, 12, 3)
    assert b0["mask"].tolist() == [1.0, 0.0] and b1["mask"].tolist() == [1.0, 1.0]
    assert b0["index"].tolist() == [0, -1] and b1["index"].tolist() == [1, 2]
    c = _config("synthetic", synthetic_num_examples=1)
    batches = list(pipeline.make_eval_iterator(c, "val", "eval_center", global_batch=4,
                                               process_index=0, process_count=2))  # Empty shard.
    assert len(batches) == 1 and batches[0]["mask"].tolist() == [0.0, 0.0]


def test_folder_source_train_and_resume(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "train" / f"c{i % 3}"
        os.makedirs(folder, exist_ok=True)
        h, w = rng.integers(14, 30, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    c = _config(f"folder:{tmp_path}")
    kw = dict(global_batch=4, seed=0, process_index=0, process_count=1)
    fresh = _take(pipeline.make_train_iterator(c, "train", "train_crop_flip", **kw), 5)
    resumed = _take(pipeline.make_train_iterator(c, "train", "train_crop_flip", start_step=4,
                                                 **kw), 1)
    assert np.array_equal(fresh[4]["image"], resumed[0]["image"])
    assert sorted(np.concatenate([b["index"] for b in fresh[:3]])) == list(range(12))
