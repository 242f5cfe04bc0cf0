"""The VIPriors subset builder on a fake 3-class ImageNet."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from dvp_jax.input import vipriors

WNIDS = ("n01440764", "n01443537", "n01484850")


def _tiny_jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value % 256, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split, count in (("train", 120), ("val", 50)):
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            os.makedirs(folder)
            for i in range(count):
                (folder / f"{wnid}_{split}_{i:04d}.JPEG").write_bytes(_tiny_jpeg(c * 50 + i))
    return str(root / "train"), str(root / "val")


def _listing(out, split):
    return sorted(os.path.join(wnid, f) for wnid in os.listdir(os.path.join(out, split))
                  for f in os.listdir(os.path.join(out, split, wnid)))


def test_builds_disjoint_50_50_per_class_deterministically(imagenet, tmp_path):
    train_dir, val_dir = imagenet
    out = str(tmp_path / "a")
    lists = vipriors.build_subset(train_dir, out, seed=0, imagenet_val=val_dir,
                                  write_file_lists=True)
    for wnid in WNIDS:
        train = set(os.listdir(os.path.join(out, "train", wnid)))
        val = set(os.listdir(os.path.join(out, "val", wnid)))
        assert len(train) == len(val) == 50 and not train & val
        assert len(os.listdir(os.path.join(out, "test", wnid))) == 50
    link = os.path.join(out, "train", lists["train"][0])
    assert os.path.islink(link) and os.path.realpath(link).startswith(os.path.realpath(train_dir))
    assert _listing(out, "train") == sorted(lists["train"])

    same = vipriors.choose_train_val(train_dir, 50, seed=0)
    assert same == {"train": lists["train"], "val": lists["val"]}
    other = vipriors.choose_train_val(train_dir, 50, seed=1)
    assert other["train"] != lists["train"]

    # File-list mode reproduces the recorded lists, copying this time.
    copied = str(tmp_path / "b")
    assert vipriors.main(["--imagenet_train", train_dir, "--out", copied, "--file_lists", out,
                          "--imagenet_val", val_dir, "--copy"]) == 0
    for split in ("train", "val", "test"):
        assert _listing(copied, split) == _listing(out, split)
    assert not os.path.islink(os.path.join(copied, "train", lists["train"][0]))


def test_output_reads_as_a_folder_source(imagenet, tmp_path):
    from dvp_jax import config_base
    from dvp_jax.input import sources
    out = str(tmp_path / "v")
    vipriors.build_subset(imagenet[0], out, per_class=5, seed=2)
    c = config_base.input_config(f"folder:{out}", image_size=8)
    src = sources.get_source(c)
    assert src.info("train") == sources.SplitInfo(15, 3, WNIDS)
    assert src.info("train+val").num_examples == 30


def test_errors_are_clear(imagenet, tmp_path):
    train_dir, _ = imagenet
    with pytest.raises(vipriors.BuildError, match=r"nowhere does not exist"):
        vipriors.build_subset(str(tmp_path / "nowhere"), str(tmp_path / "o1"))
    with pytest.raises(vipriors.BuildError,
                       match=r"Class n01440764 has 120 images .* fewer than the 140 needed"):
        vipriors.build_subset(train_dir, str(tmp_path / "o2"), per_class=70)
    lists = tmp_path / "lists"
    os.makedirs(lists)
    (lists / "train.txt").write_text("n01440764/missing.JPEG\n")
    (lists / "val.txt").write_text("")
    with pytest.raises(vipriors.BuildError, match=r"1 listed file\(s\) do not exist.*missing.JPEG"):
        vipriors.build_subset(train_dir, str(tmp_path / "o3"), file_lists=str(lists))
    assert vipriors.main(["--imagenet_train", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "o4")]) == 2


@pytest.mark.parametrize("bad_line, message", [
    ("n01440764/../../secret.JPEG", r"train.txt line 2: .*'\.\.'"),
    ("/etc/passwd", r"train.txt line 2: .*absolute"),
    ("n01440764/n01440764_train_0000.JPEG", r"train.txt line 2: .* listed twice \(first on line 1\)"),
])
def test_file_lists_refuse_escapes_and_duplicates_naming_the_line(imagenet, tmp_path, capsys,
                                                                  bad_line, message):
    train_dir, _ = imagenet
    (tmp_path / "secret.JPEG").write_bytes(_tiny_jpeg(1))
    lists = tmp_path / "lists"
    os.makedirs(lists)
    (lists / "train.txt").write_text(f"n01440764/n01440764_train_0000.JPEG\n{bad_line}\n")
    (lists / "val.txt").write_text("n01440764/n01440764_train_0001.JPEG\n")
    out = tmp_path / "out"
    with pytest.raises(vipriors.BuildError, match=message):
        vipriors.build_subset(train_dir, str(out), file_lists=str(lists), copy=True)
    assert vipriors.main(["--imagenet_train", train_dir, "--out", str(out), "--file_lists",
                          str(lists), "--copy"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["lists", "secret.JPEG"]


def test_symlink_escaping_the_source_tree_is_refused_and_nothing_half_built(imagenet, tmp_path):
    """A class folder that is a symlink to elsewhere: refused, and no OUT is left behind."""
    train_dir, _ = imagenet
    outside = tmp_path / "outside"
    os.makedirs(outside)
    (outside / "x.JPEG").write_bytes(_tiny_jpeg(3))
    tree = tmp_path / "tree"
    os.makedirs(tree / "n01")
    (tree / "n01" / "a.JPEG").write_bytes(_tiny_jpeg(4))
    os.symlink(outside, tree / "n02")
    lists = tmp_path / "lists"
    os.makedirs(lists)
    (lists / "train.txt").write_text("n01/a.JPEG\nn02/x.JPEG\n")
    (lists / "val.txt").write_text("")
    out = tmp_path / "out"
    with pytest.raises(vipriors.BuildError, match=r"'n02/x.JPEG' resolves to .*outside"):
        vipriors.build_subset(str(tree), str(out), file_lists=str(lists))
    assert not out.exists()
    assert not [d for d in os.listdir(tmp_path) if "building" in d]  # Staging folder removed.
