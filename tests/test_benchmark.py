"""The benchmark command: its JSON records, and no recompilation after the first step."""
import jax

from dvp_jax import benchmark, benchmark_input


def test_benchmark_reports_and_never_recompiles(capsys):
    records = benchmark.main(["moco", "supervised", "--model", "resnet18", "--width", "0.125",
                              "--small_stem", "--res", "16", "--batch", "8", "--steps", "2",
                              "--repeats", "2"])
    assert [r["kind"] for r in records] == ["moco", "supervised"]
    for r in records:
        assert r["recompiles_after_first_step"] == 0
        assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["params"] > 0
        assert r["device_count"] == jax.device_count()
    out = capsys.readouterr().out.strip().splitlines()
    assert '"moco_over_supervised"' in out[-1]


def test_compile_counter_sees_a_recompilation():
    """The counter the benchmark asserts with does count compilations (it can fail)."""
    counter = benchmark.CompileCounter()
    f = jax.jit(lambda x: x * 2)
    a, b = jax.numpy.ones(3), jax.numpy.ones(4)
    before = counter.count
    f(a).block_until_ready()
    f(a).block_until_ready()  # Same shape: no compilation.
    f(b).block_until_ready()  # New shape: a second compilation.
    assert counter.count - before == 2


def test_benchmark_input_modes_and_end_to_end_train(capsys):
    records = benchmark.main(["input", "train", "--step", "supervised", "--input", "device",
                              "--model", "resnet18", "--width", "0.125", "--small_stem",
                              "--res", "8", "--batch", "4", "--steps", "1", "--repeats", "1",
                              "--num_jpegs", "8", "--input_batches", "1"])
    assert [(r["kind"], r.get("mode")) for r in records] == [
        ("input", "host"), ("input", "device"), ("train", None)]
    host, device, train = records
    assert host["images_per_s"] > 0 and device["images_per_s"] > 0
    assert device["device_augment_ms_per_batch"] > 0
    assert device["speedup_over_host"] == device["images_per_s"] / host["images_per_s"]
    assert train["input"] == "device" and train["transform"] == "train_crop_flip"
    assert train["images_per_s"] > 0 and train["step_only_images_per_s"] > 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_input_benchmark_never_writes_into_existing_data(tmp_path):
    """--jpeg_dir pointing at a data set is refused untouched; the default folder is removed."""
    import os

    import pytest

    from dvp_jax import errors
    data = tmp_path / "imagenet" / "train" / "n01"
    os.makedirs(data)
    (data / "00000.jpg").write_bytes(b"precious")
    with pytest.raises(errors.UserError, match=r"exists and is not empty"):
        benchmark.main(["input", "--jpeg_dir", str(tmp_path / "imagenet"), "--batch", "8"])
    assert (data / "00000.jpg").read_bytes() == b"precious"
    assert os.listdir(tmp_path / "imagenet" / "train") == ["n01"]

    with benchmark_input.benchmark_jpegs("", num_images=2) as folder:
        assert len(os.listdir(os.path.join(folder, "train"))) == 2
    assert not os.path.exists(folder)
    kept = tmp_path / "kept"
    with benchmark_input.benchmark_jpegs(str(kept), num_images=2) as folder:
        pass
    assert sorted(os.listdir(kept / "train")) == ["class00", "class01"]
