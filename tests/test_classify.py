"""Classification trainers ('supervised', 'linear', 'finetune'): end to end through loop.run on
tiny synthetic data, the frozen backbone of the linear readout, eval JSON, config presets.
('finetune' runs end to end in test_distill.py, where Phase 2 with lambda = 0 must equal it.)

Phase-1 checkpoints are written directly (numpy values, no compile) in the format of
dvp_jax/checkpoints.py; each trainer runs 2 steps (ResNet-18 at width 0.125, 16 px, batch 16).
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import classify as classify_config
from configs import distill as distill_config
from dvp_jax import checkpoints, config_checks, sharding, train
from dvp_jax.trainers import classify
from dvp_jax.evaluators import eval_files
from helpers import PHASE1_STEP, assert_trees_equal, leaves_with_paths, write_phase1  # noqa: E402

@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moco") / "checkpoints"
    return str(directory), write_phase1(directory)


def tiny(preset, **classify_overrides):
    """2 steps (half an epoch of 64 synthetic images at batch 16), eval at the end."""
    config = classify_config.get_config(preset)
    config.num_epochs = 0.5
    for k, v in classify_overrides.items():
        config.classify[k] = v
    return config


def check_run_outputs(workdir, trainer, steps=2):
    ckpt = os.path.join(workdir, "checkpoints")
    assert checkpoints.latest_step(ckpt) == steps
    meta = checkpoints.load_meta(ckpt)
    assert meta["trainer"] == trainer and meta["model"]["num_classes"] == 10
    with open(os.path.join(workdir, "eval_val.json")) as f:
        result = json.load(f)
    assert result["split"] == "val" and result["step"] == steps
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["num_examples"] == 64
    with open(os.path.join(workdir, "best_val.json")) as f:
        best = json.load(f)
    assert best["label"] == "best val epoch (reference protocol)" and best["top1"] >= result["top1"]
    return meta, result


def test_supervised_end_to_end(tmp_path):
    workdir = str(tmp_path / "sup")
    state = train.train_and_evaluate(tiny("runlocal"), workdir)
    check_run_outputs(workdir, "supervised")
    assert int(state["step"]) == 2
    assert any("backbone" in p for p in leaves_with_paths(state["opt_state"]))


def test_linear_readout_leaves_the_backbone_bitwise_unchanged(tmp_path, phase1):
    directory, variables = phase1
    workdir = str(tmp_path / "linear")
    state = train.train_and_evaluate(tiny("linear_runlocal", init_checkpoint=directory), workdir)
    meta, _ = check_run_outputs(workdir, "linear")
    assert meta["init"]["step"] == PHASE1_STEP
    # The backbone and its BN statistics are the Phase-1 ones, bit for bit.
    assert_trees_equal(state["params"]["backbone"], variables["params"]["backbone"])
    assert_trees_equal(state["batch_stats"], {"backbone": variables["batch_stats"]["backbone"]})
    _, saved, _ = checkpoints.load_raw(os.path.join(workdir, "checkpoints"))
    assert_trees_equal(saved["params"]["backbone"], variables["params"]["backbone"])
    assert_trees_equal(saved["batch_stats"]["backbone"], variables["batch_stats"]["backbone"])
    # Optimizer state exists for the classifier only.
    opt_paths = list(leaves_with_paths(state["opt_state"]))
    assert opt_paths and all("backbone" not in p for p in opt_paths)
    assert any("classifier" in p for p in opt_paths)
    # The classifier was trained (momentum buffers non-zero).
    assert any(np.abs(v).sum() > 0 for p, v in leaves_with_paths(state["opt_state"]).items()
               if "classifier" in p)


def test_trainers_refuse_a_missing_or_unexpected_init_checkpoint(phase1):
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="needs config.classify.init_checkpoint"):
        classify.build_task(tiny("finetune_runlocal", init_checkpoint=""), mesh)
    with pytest.raises(ValueError, match="starts from random weights"):
        classify.build_task(tiny("runlocal", init_checkpoint=phase1[0]), mesh)


def test_init_checkpoint_of_another_width_names_both_shapes(tmp_path):
    directory = tmp_path / "wide" / "checkpoints"
    write_phase1(directory, width=0.25)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"shape \(16,\) in the checkpoint but \(8,\) in the configured model"):
        classify.build_task(tiny("finetune_runlocal", init_checkpoint=str(directory)),
                            sharding.make_mesh())


@pytest.mark.parametrize("module,presets", [
    (classify_config, classify_config.PRESETS), (distill_config, distill_config.PRESETS)])
def test_every_preset_is_valid(module, presets):
    for preset in presets:
        config = module.get_config(preset)
        config_checks.validate(config)
        assert config.trainer in train.TRAINERS
        # Title line, then the exact launch command of the default preset.
        command = module.__doc__.strip().splitlines()[2].strip()
        assert command.startswith(f"python -m dvp_jax.main --config=configs/{module.__name__.split('.')[-1]}.py:")
    with pytest.raises(ValueError, match="Unknown preset"):
        module.get_config("nope")


def test_paper_recipes():
    sup = classify_config.get_config("supervised")
    assert (sup.optim.base_lr, sup.optim.nesterov, sup.optim.weight_decay) == (0.1, True, 1e-4)
    assert tuple(sup.optim.decay_epochs) == (30.0, 60.0, 90.0) and sup.num_epochs == 100
    lin = classify_config.get_config("linear")
    assert (lin.optim.base_lr, lin.optim.weight_decay, lin.optim.momentum) == (30.0, 0.0, 0.9)
    assert tuple(lin.optim.decay_epochs) == (60.0, 80.0)
    assert classify_config.get_config("vipriors_448").input.image_size == 448
    assert classify_config.get_config("vipriors_resnext101").model.name == "resnext101_32x8d"


def test_best_val_epoch_bookkeeping(tmp_path):
    """The reference's protocol: the best top-1 over evaluations, ties to the later one, its
    own top-5; resumed from WORKDIR/best_<split>.json, a stale (later-step) record dropped."""
    workdir = str(tmp_path)
    tracker = eval_files.BestEpoch(workdir, "val")
    seen = []
    for step, top1, top5 in ((7, 50.0, 90.0), (14, 60.0, 91.0), (21, 55.0, 99.0),
                             (28, 60.0, 92.0), (35, 40.0, 80.0)):
        seen.append(tracker({"top1": top1, "top5": top5, "step": step})["step"])
    assert seen == [7, 14, 14, 28, 28]
    assert eval_files.read_best(workdir, "val") == {"top1": 60.0, "top5": 92.0, "step": 28}
    resumed = eval_files.BestEpoch(workdir, "val")
    assert resumed({"top1": 58.0, "top5": 95.0, "step": 42})["step"] == 28
    fresh = eval_files.BestEpoch(workdir, "val")  # A new run in the same workdir: step 7 < 28.
    assert fresh({"top1": 10.0, "top5": 20.0, "step": 7})["top1"] == 10.0
    assert eval_files.read_best(workdir, "val")["step"] == 7


def test_mixup_loss_on_a_fixed_batch_matches_numpy():
    """Mixup as the release: lam ~ Beta(1, 1), one permutation; CE = lam CE(y) + (1-lam) CE(y[p])
    on the logits of the MIXED batch; the extra term (Phase 2's teacher) sees the mixed batch."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from dvp_jax.trainers import classify

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return {"logits": nn.Dense(3)(x.reshape(x.shape[0], -1))}

    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    model = Linear()
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    state = {"step": jnp.asarray(3, jnp.int32), "params": params, "batch_stats": {},
             "rng": jax.random.PRNGKey(7), "opt_state": optax.sgd(0.0).init({"params": params})}
    seen = {}
    extra = classify.ExtraTerm(
        trainable_keys=(), init=None,
        prepare=lambda s, batch: seen.setdefault("image", batch["image"]),
        loss=lambda trainable, s, out, ctx: (jnp.zeros(()), {}, {}))
    step = classify.make_train_step(model, optax.sgd(0.0), mixup_alpha=1.0, extra=extra)
    _, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})

    mixed, labels_b, lam = classify.mixup(classify.step_rngs(state)[0], jnp.asarray(images),
                                          jnp.asarray(labels), 1.0)
    lam = float(lam)
    partner = (np.asarray(mixed) - lam * images) / (1 - lam)  # = images[perm]
    perm = [int(np.argmin(np.abs(images - partner[i]).sum(axis=(1, 2, 3)))) for i in range(6)]
    np.testing.assert_allclose(images[perm], partner, atol=1e-4)
    assert sorted(perm) == list(range(6)) and np.array_equal(np.asarray(labels_b), labels[perm])
    np.testing.assert_allclose(np.asarray(seen["image"]), np.asarray(mixed), atol=1e-6)
    w, b = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    logits = np.asarray(mixed).reshape(6, -1) @ w + b
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(lam * logp[np.arange(6), labels] + (1 - lam) * logp[np.arange(6), labels[perm]]).mean()
    assert float(metrics["ce"]) == pytest.approx(expected, rel=1e-5)
    lams = [float(classify.mixup(jax.random.PRNGKey(i), jnp.zeros((2, 1)), jnp.zeros(2, jnp.int32),
                                 1.0)[2]) for i in range(300)]
    assert abs(np.mean(lams) - 0.5) < 0.05 and abs(np.var(lams) - 1 / 12) < 0.02  # Beta(1, 1).
