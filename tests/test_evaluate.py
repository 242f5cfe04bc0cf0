"""dvp_jax.evaluate against numpy references computed from model.apply on the same images.

Tiny models (ResNet-18 at width 0.125, small stem, 16 px) with random variables are saved in
the project's checkpoint format; the evaluator's top-1 / top-5 / ten-crop / ensemble / k-NN
numbers must equal brute-force numpy on logits and features computed here directly.
``reference_logits`` + ``assert_matches_reference`` take any checkpoint directory, so tests of
real trainers can reuse them.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvp_jax import checkpoints, config_base, evaluate, features, sharding
from dvp_jax.evaluators import accuracy, ensemble, eval_files, knn, members, multicrop, passes
from dvp_jax.evaluators.data import EvalData
from dvp_jax.models.spec import ModelSpec
from helpers import REPO, write_checkpoint  # noqa: E402

NUM_EXAMPLES, NUM_CLASSES, SIZE, BATCH = 32, 10, 16, 12  # 32 / 12: the last batch is padded.


def model_kwargs(num_classes=NUM_CLASSES, projection_dims=()):
    return dict(name="resnet18", num_classes=num_classes, projection_dims=list(projection_dims),
                bn_groups=1, small_stem=True, width_multiplier=0.125, dtype="float32",
                zero_init_residual=False)


def input_section():
    c = config_base.input_config(source="synthetic", image_size=SIZE)
    c.synthetic_num_examples = NUM_EXAMPLES
    c.synthetic_num_classes = NUM_CLASSES
    return c


_APPLY_CACHE = {}


def apply_fn(kwargs):
    """A jitted (variables, images [N, S, S, 3]) -> model outputs, one per architecture."""
    kwargs = dict(kwargs, bn_groups=1)
    name = json.dumps(kwargs, sort_keys=True)
    if name not in _APPLY_CACHE:
        model = ModelSpec(**kwargs).build()
        _APPLY_CACHE[name] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return _APPLY_CACHE[name]


def random_variables(kwargs, seed):
    """Random variables of the model (numpy; no init program is compiled): He-normal kernels,
    BN scale ~1, small biases, BN statistics mean ~0, var ~1."""
    model = ModelSpec(**kwargs).build()
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            std = np.sqrt(2.0 / max(1, int(np.prod(x.shape[:-1]))))
            return (rng.normal(size=x.shape) * std).astype(np.float32)
        if "scale" in name:
            return rng.uniform(0.8, 1.2, x.shape).astype(np.float32)
        if "var" in name:
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return (rng.normal(size=x.shape) * 0.1).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def spread_classifier(kwargs, variables, seed):
    """Rescales the classifier so that logits vary strongly between the val images (a random
    backbone's pooled features barely differ between the synthetic images)."""
    images, _ = eval_images(input_section(), "val", "eval_center")
    pooled = np.asarray(apply_fn(kwargs)(variables, images)["pooled"], np.float64)
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6
    kernel = np.random.default_rng(seed).normal(size=(pooled.shape[1], kwargs["num_classes"]))
    kernel = kernel / std[:, None] * 2.0 / np.sqrt(pooled.shape[1])
    classifier = {"kernel": kernel.astype(np.float32), "bias": (-mean @ kernel).astype(np.float32)}
    return {"params": dict(variables["params"], classifier=classifier),
            "batch_stats": variables["batch_stats"]}


def save_checkpoint(directory, kwargs, seed, *, trainer="supervised", with_config=True, step=7,
                    spread=True):
    """A checkpoint in the project format (state with opt_state beside params/batch_stats)."""
    variables = random_variables(kwargs, seed)
    if kwargs["num_classes"] and spread:
        variables = spread_classifier(kwargs, variables, seed)
    state = {"step": np.int32(step), "params": variables["params"],
             "batch_stats": variables["batch_stats"],
             "opt_state": {"dummy": np.zeros(3, np.float32)}}
    meta = {"trainer": trainer, "model": kwargs}
    if with_config:
        meta["config"] = {"trainer": trainer, "batch_size": BATCH,
                          "input": json.loads(input_section().to_json())}
    return write_checkpoint(directory, step, state, meta)


def eval_images(input_config, split, transform):
    """All real examples of ``split``: (images [N, ...], labels [N])."""
    from dvp_jax.input import pipeline
    images, labels = [], []
    for b in pipeline.make_eval_iterator(input_config, split, transform, global_batch=BATCH,
                                         image_size=int(input_config.image_size)):
        keep = b["mask"] > 0
        images.append(b["image"][keep])
        labels.append(b["label"][keep])
    return np.concatenate(images), np.concatenate(labels)


def apply_model(directory, images, key):
    """``key`` output of the checkpoint's model on images [N, S, S, 3] (inference mode)."""
    meta, variables = checkpoints.load_model_variables(directory)
    return np.asarray(apply_fn(meta["model"])(variables, jnp.asarray(images))[key], np.float64)


def reference_logits(directory, split="val", input_config=None):
    """(logits [N, C], labels [N]) of a checkpoint on its recorded data, computed directly."""
    meta = checkpoints.load_meta(members.resolve_checkpoint_dir(directory))
    input_config = input_config or members.make_input_config(meta)
    images, labels = eval_images(input_config, split, "eval_center")
    return apply_model(members.resolve_checkpoint_dir(directory), images, "logits"), labels


def numpy_topk(scores, labels):
    """{'top1', 'top5'} in percent; rank = larger scores + equal ones at a smaller class index."""
    own = scores[np.arange(len(labels)), labels][:, None]
    before = np.arange(scores.shape[1])[None, :] < labels[:, None]
    rank = (scores > own).sum(-1) + ((scores == own) & before).sum(-1)
    return {"top1": 100.0 * np.mean(rank < 1), "top5": 100.0 * np.mean(rank < 5)}


def reference_knn(directory, input_config, *, k, temperature, split="val", bank_split="train",
                  feature="pooled"):
    """Brute-force weighted k-NN {'top1', 'top5'} of a checkpoint's ``feature`` (numpy)."""
    q_img, q_lab = eval_images(input_config, split, "eval_center")
    b_img, b_lab = eval_images(input_config, bank_split, "eval_center")
    q = apply_model(directory, q_img, feature)
    b = apply_model(directory, b_img, feature)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = q @ b.T
    scores = np.zeros((len(q), int(max(q_lab.max(), b_lab.max())) + 1))
    for i in range(len(q)):
        for j in np.argsort(-sim[i])[:k]:
            scores[i, b_lab[j]] += np.exp(sim[i, j] / temperature)
    return numpy_topk(scores, q_lab)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def assert_matches_reference(directory, split="val", **kwargs):
    """Evaluates ``directory`` with the library and checks top-1/top-5 against numpy."""
    got = evaluate.evaluate_checkpoints([directory], split=split, **kwargs)
    logits, labels = reference_logits(directory, split)
    ref = numpy_topk(logits, labels)
    assert got["num_examples"] == len(labels)
    assert got["top1"] == pytest.approx(ref["top1"]) and got["top5"] == pytest.approx(ref["top5"])
    return got, logits, labels


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {
        "a": save_checkpoint(root / "a" / "checkpoints", model_kwargs(), seed=0),
        "b": save_checkpoint(root / "b" / "checkpoints", model_kwargs(), seed=1),
        "enc": save_checkpoint(root / "enc", model_kwargs(num_classes=0), seed=2,
                               trainer="converted", with_config=False, step=0),
        "five": save_checkpoint(root / "five", model_kwargs(num_classes=5), seed=3, spread=False),
        "root": str(root),
    }


def test_single_checkpoint_topk_and_workdir(ckpts):
    got, logits, labels = assert_matches_reference(ckpts["a"])
    assert got["split"] == "val" and got["steps"] == [7] and got["batch_size"] == BATCH
    assert got["checkpoints"] == [ckpts["a"]]
    assert 0.0 < got["top5"] and got["top1"] <= got["top5"]  # Able to fail: nonzero top-5.
    # The workdir itself is accepted (DIR/checkpoints is found).
    assert members.resolve_checkpoint_dir(os.path.dirname(ckpts["a"])) == ckpts["a"]
    json.dumps(got)


def test_ensembles_average_softmax(ckpts):
    a_logits, labels = reference_logits(ckpts["a"])
    b_logits, _ = reference_logits(ckpts["b"])
    single = evaluate.evaluate_checkpoints([ckpts["a"]], split="val")
    twice = evaluate.evaluate_checkpoints([ckpts["a"], ckpts["a"]], split="val")
    assert (twice["top1"], twice["top5"]) == (single["top1"], single["top5"])
    pair = evaluate.evaluate_checkpoints([ckpts["a"], ckpts["b"]], split="val")
    mean = (softmax(a_logits) + softmax(b_logits)) / 2
    ref = numpy_topk(mean, labels)
    assert pair["top1"] == pytest.approx(ref["top1"]) and pair["top5"] == pytest.approx(ref["top5"])
    # The ensemble differs from each member on this data (else the test could not fail).
    expected = [numpy_topk(a_logits, labels), numpy_topk(b_logits, labels)]
    assert [m["top1"] for m in pair["members"]] == pytest.approx([m["top1"] for m in expected])
    assert np.any(np.argmax(mean, 1) != np.argmax(a_logits, 1))


def test_ten_crop_is_mean_of_crop_softmax(ckpts):
    got = evaluate.evaluate_checkpoints([ckpts["a"]], split="val", ten_crop=True)
    meta = checkpoints.load_meta(ckpts["a"])
    crops, labels = eval_images(members.make_input_config(meta), "val", "ten_crop")
    assert crops.shape == (NUM_EXAMPLES, 10, SIZE, SIZE, 3)
    meta, variables = checkpoints.load_model_variables(ckpts["a"])
    run = apply_fn(meta["model"])
    probs = np.mean([softmax(np.asarray(run(variables, crops[:, i])["logits"], np.float64))
                     for i in range(10)], axis=0)
    ref = numpy_topk(probs, labels)
    assert got["ten_crop"] and got["num_examples"] == NUM_EXAMPLES
    assert got["top1"] == pytest.approx(ref["top1"]) and got["top5"] == pytest.approx(ref["top5"])
    # The scores themselves: log of the crop-mean softmax.
    member = members.load_member(ckpts["a"])
    plugin = multicrop.TenCropAccuracy(member.spec.build(), EvalData(member.input_config, BATCH),
                                       "val", sharding.make_mesh())
    scores = plugin.predict(member.variables).scores
    np.testing.assert_allclose(np.exp(scores), probs, rtol=2e-4, atol=1e-6)


def test_knn_on_encoder_without_classifier(ckpts):
    overrides = {"source": "synthetic", "image_size": SIZE, "synthetic_num_examples": NUM_EXAMPLES}
    with pytest.raises(evaluate.EvaluationError, match="--knn"):
        evaluate.evaluate_checkpoints([ckpts["enc"]], split="val", input_overrides=overrides)
    with pytest.raises(evaluate.EvaluationError, match="--source"):
        evaluate.evaluate_checkpoints([ckpts["enc"]], split="val", knn=True)
    k, t = 5, 0.1
    got = evaluate.evaluate_checkpoints([ckpts["enc"]], split="val", knn=True, knn_k=k,
                                        knn_temperature=t, batch_size=BATCH,
                                        input_overrides=overrides)
    assert "top1" not in got
    ref = reference_knn(ckpts["enc"], members.make_input_config({}, overrides=overrides),
                        k=k, temperature=t)
    assert got["knn_top1"] == pytest.approx(ref["top1"])
    assert got["knn_top5"] == pytest.approx(ref["top5"])
    assert got["knn_bank_split"] == "train" and got["knn_bank_size"] == NUM_EXAMPLES


def test_ensemble_errors(ckpts):
    overrides = {"source": "synthetic", "image_size": SIZE, "synthetic_num_examples": NUM_EXAMPLES}
    with pytest.raises(evaluate.EvaluationError, match="no classifier"):
        evaluate.evaluate_checkpoints([ckpts["a"], ckpts["enc"]], split="val",
                                      input_overrides=overrides)
    with pytest.raises(evaluate.EvaluationError, match="same number of classes"):
        evaluate.evaluate_checkpoints([ckpts["a"], ckpts["five"]], split="val")
    with pytest.raises(evaluate.EvaluationError, match="5-way classifier .* 10 classes"):
        evaluate.evaluate_checkpoints([ckpts["five"]], split="val")
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        evaluate.evaluate_checkpoints([os.path.join(ckpts["root"], "nope")], split="val")
    with pytest.raises(checkpoints.CheckpointError, match="no step 3; its steps are \\[7\\]"):
        evaluate.evaluate_checkpoints([ckpts["a"]], split="val", step=3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dvp_jax.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_json_and_matches(ckpts, tmp_path):
    out = tmp_path / "res.json"
    best = {"top1": 61.5, "top5": 90.0, "step": 5, "epoch": 2.5, "split": "val",
            "label": "best val epoch (reference protocol)"}  # As the trainers write it.
    with open(os.path.join(os.path.dirname(ckpts["a"]), "best_val.json"), "w") as f:
        json.dump(best, f)
    r = _cli(f"--checkpoint={os.path.dirname(ckpts['a'])}", "--split=val", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    logits, labels = reference_logits(ckpts["a"])
    ref = numpy_topk(logits, labels)
    assert got["top1"] == pytest.approx(ref["top1"]) and got["top5"] == pytest.approx(ref["top5"])
    assert got["num_examples"] == NUM_EXAMPLES and got["checkpoints"] == [ckpts["a"]]
    assert "top1" in r.stdout
    assert got["best_val_epoch"] == best  # Reported beside this (final) checkpoint's accuracy.
    assert "final (this checkpoint) top1" in r.stdout
    assert "best val epoch (reference protocol): top1 61.50 at epoch 2.5" in r.stdout


def test_cli_converted_needs_source_then_works(ckpts):
    r = _cli(f"--checkpoint={ckpts['enc']}", "--knn")
    assert r.returncode == 2 and "--source" in r.stderr and "--image_size" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(f"--checkpoint={ckpts['enc']}", "--knn", "--knn_k=5", "--source=synthetic",
             f"--image_size={SIZE}", f"--batch_size={BATCH}")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(ckpts["root"], "eval_val.json")) as f:  # Default: DIR/../eval_val.json.
        got = json.load(f)
    assert got["knn_k"] == 5 and got["num_examples"] == 256  # input_config()'s synthetic default.
    assert 0.0 <= got["knn_top1"] <= got["knn_top5"] <= 100.0 and "top1" not in got


def test_cli_errors_exit_2_without_traceback(tmp_path):
    (tmp_path / "not_orbax").mkdir()
    (tmp_path / "not_orbax" / "file.txt").write_text("hello")
    for path, words in [(tmp_path / "missing", "does not exist"),
                        (tmp_path / "not_orbax", "no Orbax checkpoint")]:
        r = _cli(f"--checkpoint={path}")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert words in r.stderr and "Traceback" not in r.stderr


def test_default_output_path():
    assert evaluate.default_output_path("/w/run/checkpoints", "val") == "/w/run/eval_val.json"
    path = evaluate.default_output_path("/w/run/checkpoints/", "train[:10%]", ten_crop=True,
                                        ensemble=True)
    assert path == "/w/run/eval_train__10___tencrop_ensemble.json"


# ----------------------------------------------------------------------------- the plug-ins


def test_plugins_on_variables_match_numpy(ckpts):
    """Each plug-in, built once and called on variables, equals the numpy reference; the
    ensemble of two models is their mean softmax; a shared pass gives the k-NN queries."""
    mesh = sharding.make_mesh()
    a, b = members.load_member(ckpts["a"]), members.load_member(ckpts["b"])
    data = EvalData(a.input_config, BATCH)
    model = a.spec.build()
    a_logits, labels = reference_logits(ckpts["a"])
    b_logits, _ = reference_logits(ckpts["b"])
    plugin = accuracy.Accuracy(model, data, "val", mesh, feature="pooled")
    got = plugin(a.variables)
    assert got == pytest.approx(numpy_topk(a_logits, labels)) and set(got) == {"top1", "top5"}
    pred = plugin.predict(a.variables)
    np.testing.assert_allclose(pred.scores, a_logits, rtol=1e-4, atol=1e-4)
    assert pred.features.shape == (NUM_EXAMPLES, 64) and np.array_equal(pred.labels, labels)
    pair = ensemble.Ensemble([plugin, accuracy.Accuracy(model, data, "val", mesh)])
    mean = (softmax(a_logits) + softmax(b_logits)) / 2
    assert pair([a.variables, b.variables]) == pytest.approx(numpy_topk(mean, labels))
    with pytest.raises(ValueError, match="1 models' variables for 2"):
        pair([a.variables])
    k_nn = knn.Knn(model, data, "val", "train", mesh, k=5, temperature=0.1)
    ref = reference_knn(ckpts["a"], a.input_config, k=5, temperature=0.1)
    assert k_nn(a.variables) == pytest.approx(ref)
    assert k_nn(a.variables, query=pred) == k_nn(a.variables)  # The shared pass's queries.


def test_plugin_passes_equal_the_model_outputs_bit_for_bit(ckpts):
    """The plug-ins' predict functions give exactly what the model's own output gives
    (features.model_output), so the training loop's numbers did not move."""
    mesh = sharding.make_mesh()
    a = members.load_member(ckpts["a"])
    data = EvalData(a.input_config, BATCH)
    model = a.spec.build()
    for key, predict in [("logits", passes.predict_fn(model, logits=True, feature=None)),
                         ("pooled", passes.predict_fn(model, logits=False, feature="pooled"))]:
        want, want_labels = features.extract(features.model_output(model, key), a.variables,
                                             data.batches("val"), mesh)
        got, got_labels = passes.run_pass(predict, a.variables, data, "val", "eval_center", mesh)
        assert np.array_equal(got, want) and np.array_equal(got_labels, want_labels)
    # Equal models share one predict function (one compiled program per architecture).
    assert passes.predict_fn(a.spec.build(), logits=True, feature=None) is \
        passes.predict_fn(model, logits=True, feature=None)


def test_offline_data_errors_name_the_split(ckpts):
    """A split that yields no batches: EvaluationError naming it offline, ValueError in the
    training loop (a bug there)."""
    mesh = sharding.make_mesh()
    a = members.load_member(ckpts["a"])
    model = a.spec.build()

    class Empty(EvalData):
        def batches(self, split, transform="eval_center"):
            return iter(())

    with pytest.raises(evaluate.EvaluationError, match="Split 'val' of 'synthetic': .*no batches"):
        accuracy.Accuracy(model, Empty(a.input_config, BATCH, offline=True), "val", mesh)(
            a.variables)
    with pytest.raises(ValueError, match="^The evaluation split yielded no batches") as e:
        accuracy.Accuracy(model, Empty(a.input_config, BATCH), "val", mesh)(a.variables)
    assert not isinstance(e.value, evaluate.EvaluationError)


def test_eval_json_paths_and_writer(tmp_path):
    assert eval_files.offline_eval_path("/w", "val[:1.5%]", ten_crop=True) == \
        "/w/eval_val__1_5___tencrop.json"
    path = eval_files.write_eval_json(str(tmp_path), {"split": "val[:1.5%]", "top1": 1.0})
    assert path == str(tmp_path / "eval_val__1.5__.json")
    assert json.loads((tmp_path / "eval_val__1.5__.json").read_text()) == {
        "split": "val[:1.5%]", "top1": 1.0}
