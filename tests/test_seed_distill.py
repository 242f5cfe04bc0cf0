"""SEED: the frozen teacher, the queue of teacher embeddings, the loss, and a run via loop.run.

CPU compiles dominate: the tests share one Task (module fixture), and step the state with the
very jit options loop.run uses, so the run through loop.run reuses the compiled programs.
"""
import dataclasses
import shutil

import jax
import numpy as np
import optax
import pytest

from configs import seed_distill as seed_distill_config
from dvp_jax import checkpoints, loop, objectives, pretrained, sharding
from dvp_jax.trainers import seed_distill
from dvp_jax.models.spec import ModelSpec
from helpers import write_model_checkpoint  # noqa: E402

TEACHER_KWARGS = dict(name="resnet18", small_stem=True, width_multiplier=0.25, dtype="float32",
                      zero_init_residual=False, projection_dims=[32, 16], bn_groups=1)


def _teacher_fill(rng, path, shape):
    """BN running statistics far from (0, 1), so that inference-mode BN matters."""
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
        return rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[:-1]))
    if name.endswith("['mean']") or name.endswith("['bias']"):
        return rng.normal(0, 0.5, shape)
    return rng.uniform(0.5, 2.0, shape)  # BN scale and running var


def write_teacher(directory, step=1, seed_=0, projection=True):
    """A tiny 'Phase-1' checkpoint: random params and BN running statistics far from (0, 1)."""
    kwargs = dict(TEACHER_KWARGS, projection_dims=TEACHER_KWARGS["projection_dims"] if projection
                  else [])
    return write_model_checkpoint(directory, kwargs, _teacher_fill, step=step, seed=seed_)


def tiny_config(teacher_dir, **overrides):
    config = seed_distill_config.get_config("runlocal")
    config.seed_distill.teacher_checkpoint = str(teacher_dir)
    for k, v in overrides.items():
        config.seed_distill[k] = v
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, mesh, task) of a runlocal SEED run with a tiny written teacher."""
    d = tmp_path_factory.mktemp("teacher") / "checkpoints"
    write_teacher(d)
    config = tiny_config(d)  # K = 64, batch 16: the ring wraps after 4 steps.
    config.knn.teacher = False  # Saves a compile; the student's k-NN runs.
    mesh = sharding.make_mesh()
    return config, mesh, seed_distill.build_task(config, mesh)


def loop_jits(task, mesh):
    """init and step jitted exactly as loop.run does (so loop.run hits the same compiles)."""
    rep = sharding.replicated(mesh)
    init = jax.jit(task.init_state, out_shardings=rep)
    step = jax.jit(task.train_step, donate_argnums=0,
                   in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=(rep, rep))
    return init, step


def random_batches(config, n, seed_=0):
    rng = np.random.default_rng(seed_)
    s = config.input.image_size
    return [{"view1": rng.normal(size=(config.batch_size, s, s, 3)).astype(np.float32)}
            for _ in range(n)]


def test_queue_ring_frozen_teacher_and_loss(setup):
    config, mesh, task = setup
    teacher = seed_distill.load_teacher(config.seed_distill)
    teacher_model = seed_distill.teacher_spec(teacher, "float32").build()
    student = ModelSpec.from_meta(task.meta["model"]).build()  # bn_groups = 1 as in training here.
    init, step = loop_jits(task, mesh)
    state = init(jax.random.PRNGKey(config.seed))
    frozen = jax.device_get(teacher.variables)
    # Before any step the state carries exactly the checkpoint's teacher.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["teacher"]), frozen)
    # The optimizer only knows the student: its momentum tree mirrors the student's params.
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert not any("teacher" in p for p in opt_paths)
    trace = optax.tree_utils.tree_get(state["opt_state"], "trace")
    assert jax.tree.structure(trace) == jax.tree.structure(state["params"])
    assert set(state["params"]) == {"backbone", "projection"}
    assert state["params"]["projection"]["dense0"]["kernel"].shape[-1] == 32  # hidden_dim
    assert state["params"]["projection"]["dense1"]["kernel"].shape[-1] == 16  # teacher's dim

    teacher_fwd = jax.jit(lambda x: objectives.l2_normalize(
        teacher_model.apply(frozen, x, train=False)["projection"]))
    student_fwd = jax.jit(lambda v, x: objectives.l2_normalize(
        student.apply(v, x, train=True, mutable=["batch_stats"])[0]["projection"]))
    queue_size, batch = config.seed_distill.queue_size, config.batch_size
    expected_rows = {}
    for i, b in enumerate(random_batches(config, 5)):
        # Teacher embeddings by hand: frozen variables, inference-mode BN, normalised.
        t = np.asarray(teacher_fwd(b["view1"]))
        if i == 0:  # The loss by hand from the student's outputs before the step.
            s = student_fwd({"params": state["params"], "batch_stats": state["batch_stats"]},
                            b["view1"])
            queue0 = np.asarray(state["queue"])
            expected_loss = objectives.seed_loss(s, t, queue0, student_temperature=0.2,
                                                 teacher_temperature=0.01)
        ptr = int(state["queue_ptr"])
        assert ptr == (i * batch) % queue_size
        for r in range(batch):
            expected_rows[(ptr + r) % queue_size] = t[r]
        state, metrics = step(state, sharding.to_global(b, mesh))
        if i == 0:
            np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-4)
            # With tau_T -> 0 the same s, t, queue give InfoNCE against the teacher key.
            cold = objectives.seed_loss(s, t, queue0, student_temperature=0.2,
                                        teacher_temperature=1e-6)
            nce, _ = objectives.margin_info_nce(s, t, queue0, margin=0.0, temperature=0.2)
            np.testing.assert_allclose(float(cold), float(nce), rtol=1e-5)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 5
    assert int(state["queue_ptr"]) == (5 * batch) % queue_size  # 80 % 64 = 16
    queue = np.asarray(state["queue"])
    # Rows 0..15 hold step 5's t (the ring wrapped), rows 16..63 steps 2..4.
    assert sorted(expected_rows) == list(range(queue_size))
    for row, t_row in expected_rows.items():
        np.testing.assert_allclose(queue[row], t_row, atol=1e-5)
    # The teacher is bitwise unchanged after 5 steps (params and BN running statistics).
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["teacher"]), frozen)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="queue_size=100 is not a multiple of config.batch_size"):
        seed_distill.check_queue(100, 16)
    with pytest.raises(ValueError, match="teacher_checkpoint is empty"):
        seed_distill.load_teacher(tiny_config("").seed_distill)
    write_teacher(tmp_path / "headless", projection=False)
    with pytest.raises(checkpoints.CheckpointError, match="no projection head"):
        seed_distill.load_teacher(tiny_config(tmp_path / "headless").seed_distill)


def test_hidden_dim_defaults_to_backbone_dim():
    config = tiny_config("unused", hidden_dim=0)
    spec = seed_distill.student_spec(config, 16, groups=1)
    assert spec.projection_dims == (64, 16)  # ResNet-18 at width 0.125: 512 / 8.


def test_run_via_loop_then_resume_refuses_another_teacher(setup, tmp_path):
    config, mesh, task = setup
    task = dataclasses.replace(task, total_steps=4)  # One epoch: 4 x 16 synthetic images.
    workdir = str(tmp_path / "seed")
    state = loop.run(task, config, workdir, mesh)
    assert int(state["step"]) == 4 and int(state["queue_ptr"]) == 0  # 4 x 16 = K = 64
    ckpt = str(tmp_path / "seed" / "checkpoints")
    meta = checkpoints.load_meta(ckpt)
    teacher_dir = config.seed_distill.teacher_checkpoint
    assert meta["trainer"] == "seed_distill"
    assert meta["teacher"] == pretrained.load(teacher_dir, keep_projection=True).describe()
    # What the classification trainers do with config.classify.init_checkpoint:
    student = pretrained.load(ckpt, keep_projection=False)
    assert set(student.variables["params"]) == {"backbone"}
    assert student.spec.width_multiplier == 0.125
    jax.tree.map(np.testing.assert_array_equal, student.variables["params"]["backbone"],
                 jax.device_get(state["params"]["backbone"]))

    # Resuming with another teacher (config change explicitly allowed) is refused.
    other = tmp_path / "other_teacher"
    write_teacher(other, seed_=1)
    config2 = tiny_config(other)
    config2.knn.teacher = False
    config2.loop.allow_config_change = True
    with pytest.raises(pretrained.TeacherMismatchError, match="distilled from the teacher"):
        loop.run(seed_distill.build_task(config2, mesh), config2, workdir, mesh)

    # The same path holding a newer, different step is caught by the fingerprint too; a copy
    # of the same teacher elsewhere is accepted.
    copy = tmp_path / "copied_teacher"
    shutil.copytree(teacher_dir, copy)
    pretrained.check_same_teacher(seed_distill.load_teacher(tiny_config(copy).seed_distill), "config.seed_distill.teacher_checkpoint")(meta)
    write_teacher(copy, step=2, seed_=2)
    with pytest.raises(pretrained.TeacherMismatchError, match="fingerprint"):
        pretrained.check_same_teacher(seed_distill.load_teacher(tiny_config(copy).seed_distill), "config.seed_distill.teacher_checkpoint")(meta)
