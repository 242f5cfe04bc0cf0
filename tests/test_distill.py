"""Phase 2 (trainer 'distill'): the frozen teacher, lambda = 0 == finetune, OFD, teacher checks.

'finetune' and 'distill' (lambda = 0) run end to end through loop.run from the same Phase-1
checkpoint; their final states must agree (the distillation step is the finetune step plus a
term). OFD is checked step by step (margins, connectors, the warm-up without distillation).

Teachers are Phase-1-like checkpoints written directly (numpy values, no compile); the student
is ResNet-18 at width 0.125 on 16-px synthetic images, batch 16.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import classify as classify_config
from configs import distill as distill_config
from dvp_jax import checkpoints, loop, models, objectives, sharding, train
from dvp_jax import pretrained
from dvp_jax.trainers import distill

from helpers import assert_trees_equal, leaves_with_paths, write_phase1  # noqa: E402


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher") / "checkpoints"
    write_phase1(directory, seed=1)
    return str(directory)


def tiny(teacher_checkpoint, **distill_overrides):
    config = distill_config.get_config("runlocal")
    config.num_epochs = 0.5  # 2 steps of 16 (4 steps per epoch).
    config.distill.teacher_checkpoint = teacher_checkpoint
    for k, v in distill_overrides.items():
        config.distill[k] = v
    return config


def random_batch(seed=0, batch=16, size=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 10, size=batch).astype(np.int32)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finetune and Phase 2 with lambda = 0 from the same Phase-1 checkpoint, 2 steps each
    through loop.run (same seed, data, recipe): their final states must agree."""
    root = tmp_path_factory.mktemp("runs")
    teacher_ckpt = str(root / "teacher" / "checkpoints")
    teacher = write_phase1(teacher_ckpt, seed=2)
    ft_config = classify_config.get_config("finetune_runlocal")
    ft_config.num_epochs = 0.5
    ft_config.classify.init_checkpoint = teacher_ckpt
    ft_state = train.train_and_evaluate(ft_config, str(root / "finetune"))
    d_config = tiny(teacher_ckpt, weight=0.0)
    d_state = train.train_and_evaluate(d_config, str(root / "distill"))
    return dict(root=root, teacher_ckpt=teacher_ckpt, teacher=teacher, ft_state=ft_state,
                d_state=d_state, d_config=d_config)


def test_finetune_end_to_end_from_phase1(runs):
    workdir = str(runs["root"] / "finetune")
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoints.latest_step(ckpt) == 2
    meta = checkpoints.load_meta(ckpt)
    assert meta["trainer"] == "finetune" and meta["init"]["directory"] == runs["teacher_ckpt"]
    assert meta["model"]["num_classes"] == 10
    with open(os.path.join(workdir, "eval_val.json")) as f:
        result = json.load(f)
    assert result["step"] == 2 and result["split"] == "val" and 0 <= result["top1"] <= 100
    teacher = runs["teacher"]
    state = runs["ft_state"]
    assert not np.array_equal(np.asarray(state["params"]["backbone"]["conv1"]["kernel"]),
                              teacher["params"]["backbone"]["conv1"]["kernel"])
    assert not np.array_equal(np.asarray(state["batch_stats"]["backbone"]["bn1"]["mean"]),
                              teacher["batch_stats"]["backbone"]["bn1"]["mean"])


def test_lambda_zero_distillation_equals_finetune(runs):
    ft, d = runs["ft_state"], runs["d_state"]
    for entry in ("params", "batch_stats", "opt_state"):
        a, b = leaves_with_paths(ft[entry]), leaves_with_paths(d[entry])
        assert a.keys() == b.keys(), entry
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=entry + k)
    assert int(d["step"]) == int(ft["step"]) == 2


def test_distill_end_to_end_keeps_the_teacher_frozen_and_refuses_another(runs):
    workdir = str(runs["root"] / "distill")
    teacher, teacher_ckpt, state = runs["teacher"], runs["teacher_ckpt"], runs["d_state"]
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoints.latest_step(ckpt) == 2
    # The teacher (params and BN statistics) is bitwise unchanged after 2 steps, in the live
    # state and in the checkpoint, and the optimizer holds no state for it.
    expected = {"params": {"backbone": teacher["params"]["backbone"]},
                "batch_stats": {"backbone": teacher["batch_stats"]["backbone"]}}
    assert_trees_equal(state["teacher"], expected)
    _, saved, _ = checkpoints.load_raw(ckpt)
    assert_trees_equal(saved["teacher"], expected)
    opt_paths = list(leaves_with_paths(state["opt_state"]))
    assert opt_paths and all("teacher" not in p for p in opt_paths)
    meta = checkpoints.load_meta(ckpt)
    fingerprint = pretrained.load(teacher_ckpt, keep_projection=False).fingerprint
    assert meta["trainer"] == "distill" and meta["teacher"]["fingerprint"] == fingerprint
    assert meta["teacher"]["directory"] == teacher_ckpt and meta["teacher"]["step"] == 10
    with open(os.path.join(workdir, "eval_val.json")) as f:
        result = json.load(f)
    assert result["step"] == 2 and result["trainer"] == "distill" and 0 <= result["top1"] <= 100

    # The Phase-1 run went on: the same directory now holds another teacher. Resuming refuses.
    write_phase1(teacher_ckpt, seed=3, step=20)
    with pytest.raises(pretrained.TeacherMismatchError, match="another teacher") as err:
        train.train_and_evaluate(runs["d_config"], workdir)
    assert fingerprint in str(err.value) and "step 20" in str(err.value)


def test_ofd_margins_connectors_warmup_and_train_mode_teacher(teacher_dir):
    mesh = sharding.make_mesh()
    config = tiny(teacher_dir)
    distill_config.use_ofd(config)
    # Counted from 1 as the released code (use_ofd): epoch 1.25 = after 0.25 epochs = 1 step
    # (4 steps per epoch): the term is 0 at step 0.
    config.distill.start_epochs = 1.25
    # The reference code's teacher BN in train mode: batch statistics, running stats discarded
    # (the teacher must stay bitwise unchanged all the same).
    config.distill.teacher_bn = "train"
    task = distill.build_task(config, mesh)
    state = loop.init_on_mesh(task.init_state, mesh, 0)
    teacher = pretrained.load(teacher_dir, keep_projection=False)
    bns = models.last_bn_of_stages(teacher.variables, "resnet18")
    for s, bn in zip(distill.STAGES, bns):
        np.testing.assert_array_equal(np.asarray(state["ofd_margins"][s]),
                                      np.asarray(objectives.ofd_margin(bn["scale"], bn["bias"])))
    assert set(state["connector_params"]) == {"conv1", "conv2", "conv3", "conv4", "bn1", "bn2",
                                              "bn3", "bn4"}
    step = jax.jit(task.train_step)
    batch = random_batch(1)
    s1, m1 = step(state, batch)
    assert float(m1["distill_weight"]) == 0.0 and float(m1["distill"]) > 0
    assert float(m1["loss"]) == float(m1["ce"])
    s2, m2 = step(s1, batch)
    assert float(m2["distill_weight"]) == 1.0
    np.testing.assert_allclose(float(m2["loss"]), float(m2["ce"]) + float(m2["distill"]), rtol=1e-5)
    # Connectors are trained by the same optimizer (their BN statistics move); the teacher is not.
    assert any("connector_params" in p for p in leaves_with_paths(s2["opt_state"]))
    assert not np.array_equal(np.asarray(s2["connector_params"]["conv4"]["kernel"]),
                              np.asarray(state["connector_params"]["conv4"]["kernel"]))
    assert not np.array_equal(np.asarray(s2["connector_batch_stats"]["bn1"]["mean"]),
                              np.asarray(state["connector_batch_stats"]["bn1"]["mean"]))
    assert_trees_equal(s2["teacher"], state["teacher"])
    assert_trees_equal(s2["ofd_margins"], state["ofd_margins"])


def test_teacher_of_another_architecture_names_both(tmp_path):
    mesh = sharding.make_mesh()
    wide = tmp_path / "wide" / "checkpoints"
    write_phase1(wide, width=0.25)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"shape \(16,\) in the checkpoint but \(8,\) in the configured model"
                       ) as err:
        distill.build_task(tiny(str(wide)), mesh)
    assert "'width_multiplier': 0.25" in str(err.value) and "'width_multiplier': 0.125" in str(err.value)
    deep = tmp_path / "deep" / "checkpoints"
    write_phase1(deep, name="resnet34")
    with pytest.raises(checkpoints.CheckpointError, match="another architecture") as err:
        distill.build_task(tiny(str(deep)), mesh)
    assert "'resnet34'" in str(err.value) and "'resnet18'" in str(err.value)


def test_config_values_are_checked(teacher_dir):
    from dvp_jax import config_checks
    config = tiny(teacher_dir, kind="kd")
    with pytest.raises(config_checks.ConfigError, match="distill.kind='kd'"):
        config_checks.validate(config)
    config = tiny("")
    with pytest.raises(ValueError, match="teacher_checkpoint is empty"):
        distill.build_task(config, sharding.make_mesh())
    paper = distill_config.get_config("vipriors")
    assert (paper.distill.kind, paper.distill.weight, paper.optim.nesterov) == ("l2", 1e-4, True)
    assert tuple(paper.optim.decay_epochs) == (30.0, 60.0, 90.0)
    ofd = distill_config.get_config("vipriors_ofd")
    assert (ofd.distill.kind, ofd.distill.weight, ofd.distill.start_epochs) == ("ofd", 1.0, 5.0)
    tricks = distill_config.get_config("vipriors_tricks")
    assert (tricks.classify.label_smoothing, tricks.input.auto_augment) == (0.1, "cifar10_released")
    assert (paper.input.augment_on, tricks.input.augment_on) == ("device", "host")


def test_epoch_counting_paper_vs_released_code():
    """The released code numbers epochs from 1: `epoch < 5` means OFD from the 5th epoch (after
    4), and lr * 0.1 ** (epoch // 30) drops after epochs 29, 59, 89. The paper's presets keep
    5 and 30/60/90."""
    from dvp_jax import optim
    spe = 10
    for preset, start, drops in (("vipriors_ofd", 4.0, (29, 59, 89)), ("digits_ofd", 4.0, (8, 17, 26)),
                                 ("vipriors", 0.0, (30, 60, 90)), ("digits", 0.0, (9, 18, 27))):
        config = distill_config.get_config(preset)
        assert distill.distill_start_epoch(config.distill) == start, preset
        oc = distill.phase2_optim_config(config)
        schedule = optim.make_schedule(oc, global_batch=256, steps_per_epoch=spe,
                                       num_epochs=config.num_epochs)
        peak = 0.1
        for k, epoch in enumerate(drops):
            before, after = float(schedule(epoch * spe - 1)), float(schedule(epoch * spe))
            assert before == pytest.approx(peak * 0.1 ** k), (preset, epoch)
            assert after == pytest.approx(peak * 0.1 ** (k + 1)), (preset, epoch)
