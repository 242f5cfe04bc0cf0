"""The models an offline evaluation restores: one ``Member`` per checkpoint.

``load_member`` restores a checkpoint (dvp_jax.pretrained), builds its model with one BN group
and the heads it holds (``ModelSpec``), checks every parameter shape, and picks its data
settings: ``config_base.input_config()`` updated with the input section the checkpoint
recorded (or the one given), then with explicit overrides (--source / --image_size).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dvp_jax import checkpoints, config_base, pretrained, sharding
from dvp_jax.evaluators.data import EvaluationError, split_info
from dvp_jax.models.spec import ModelSpec


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory: ``path`` itself, or ``path/checkpoints`` for a workdir."""
    from etils import epath
    p = epath.Path(os.fspath(path))
    try:
        has_steps = p.is_dir() and any(c.name.isdigit() for c in p.iterdir())
        nested = (p / "checkpoints")
        if not has_steps and nested.is_dir():
            return os.fspath(nested)
    except OSError:  # Unreadable / remote errors: let checkpoints.* report the path.
        pass
    return os.fspath(path)


@dataclasses.dataclass
class Member:
    """One restored model of the evaluation (an ensemble has several)."""
    directory: str
    step: int
    trainer: str
    model_meta: dict  # The model as the checkpoint recorded it.
    spec: ModelSpec  # The model built: bn_groups 1, unused heads dropped.
    variables: dict  # {'params', 'batch_stats'} replicated on the mesh.
    input_config: Any  # ml_collections.ConfigDict
    num_classes: int  # Classifier outputs; 0 = none.
    meta: dict  # The checkpoint's meta (trainer, model, config, ...).

    def describe(self) -> dict:
        return {"directory": self.directory, "step": self.step, "trainer": self.trainer,
                "model": self.model_meta, "source": self.input_config.source,
                "image_size": int(self.input_config.image_size)}


def _as_dict(section) -> dict:
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def make_input_config(meta: dict, input_config=None, overrides: dict | None = None,
                      directory: str = "the checkpoint"):
    """The input ConfigDict used to evaluate a checkpoint with ``meta`` (see module docstring)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = (meta.get("config") or {}).get("input")
    if input_config is not None:
        section = _as_dict(input_config)
    elif saved:
        section = dict(saved)
    else:
        missing = [f"--{k}" for k in ("source", "image_size") if k not in overrides]
        if missing:
            raise EvaluationError(
                f"The checkpoint at {directory!r} (trainer {meta.get('trainer', '?')!r}) records "
                f"no data settings; pass {' and '.join(missing)} (source: digits | synthetic | "
                f"tfds:NAME | folder:PATH), or --config=configs/FILE.py:PRESET.")
        section = {}
    config = config_base.input_config()
    for key, value in list(section.items()) + list(overrides.items()):
        try:
            current = config.get(key)
            if isinstance(current, int) and not isinstance(current, bool) \
                    and isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON may have turned an int into a float.
            config[key] = value
        except (TypeError, ValueError) as e:
            raise EvaluationError(f"input.{key}={value!r} for {directory!r}: {e}") from e
    return config


def load_member(directory: str, *, step: int | None = None, input_config=None,
                input_overrides: dict | None = None, keep_projection: bool = False,
                mesh=None) -> Member:
    """Restores one checkpoint, builds its model (bn_groups 1) and checks its parameter shapes."""
    directory = resolve_checkpoint_dir(directory)
    if step is not None:
        checkpoints.latest_step(directory)  # Clear errors for a missing / non-Orbax directory.
        steps = checkpoints.manager(directory, max_to_keep=None, read_only=True).all_steps()
        if step not in steps:
            raise checkpoints.CheckpointError(
                f"{directory!r} holds no step {step}; its steps are {sorted(steps)}.")
    pre = pretrained.load(directory, keep_projection=keep_projection, keep_classifier=True,
                          step=step)
    spec = pre.spec
    params = pre.variables["params"]
    num_classes = spec.num_classes
    if num_classes and "classifier" not in params:
        raise checkpoints.CheckpointError(
            f"The checkpoint at {directory!r} names a {num_classes}-way classifier but holds no "
            f"'classifier' parameters.")
    if "classifier" in params and not num_classes:
        params = {k: v for k, v in params.items() if k != "classifier"}
    model = spec.build()
    in_config = make_input_config(pre.meta, input_config, input_overrides, directory)
    size = int(in_config.image_size)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, size, size, 3)), train=False))
    variables = {"params": params, "batch_stats": pre.variables["batch_stats"]}
    what = f"checkpoint {directory!r} (model {spec.name!r})"
    pretrained.check_same_shapes(expected["params"], variables["params"], what)
    pretrained.check_same_shapes(expected.get("batch_stats", {}), variables["batch_stats"], what)
    mesh = sharding.make_mesh() if mesh is None else mesh
    variables = sharding.put_replicated(jax.tree.map(np.asarray, variables), mesh)
    return Member(directory, int(pre.step), str(pre.meta.get("trainer", "?")),
                  dict(pre.meta["model"]), spec, variables, in_config, num_classes,
                  pre.meta)


def check_members(members: list[Member], split: str, *, knn: bool, knn_feature: str,
                  ten_crop: bool) -> None:
    """Raises EvaluationError unless the members can be evaluated together as asked: an
    ensemble needs classifiers with the same number of classes, matching the split's; an
    encoder without a classifier needs the k-NN; a projection feature needs the head."""
    with_classifier = [m for m in members if m.num_classes]
    if len(members) > 1 and len(with_classifier) < len(members):
        bad = [m.directory for m in members if not m.num_classes]
        raise EvaluationError(
            f"An ensemble averages classifier outputs, but {', '.join(bad)} has no classifier "
            f"(trainer {[m.trainer for m in members if not m.num_classes]}); evaluate such "
            f"encoders one at a time with --knn.")
    if len({m.num_classes for m in with_classifier}) > 1:
        raise EvaluationError(
            "The models of an ensemble must have the same number of classes; got " +
            ", ".join(f"{m.directory}: {m.num_classes}" for m in members) + ".")
    if not with_classifier and not knn:
        raise EvaluationError(
            f"{members[0].directory} holds an encoder without a classifier (trainer "
            f"{members[0].trainer!r}, model {members[0].spec.name!r}): pass --knn "
            f"for weighted k-NN accuracy, or evaluate a linear / finetune / distill checkpoint.")
    if ten_crop and not with_classifier:
        raise EvaluationError("--ten_crop averages classifier softmax over crops; "
                              f"{members[0].directory} has no classifier (use --knn alone).")
    for m in with_classifier:
        info = split_info(m.input_config, split)
        if info.num_classes != m.num_classes:
            raise EvaluationError(
                f"{m.directory} has a {m.num_classes}-way classifier but split {split!r} of "
                f"source {m.input_config.source!r} has {info.num_classes} classes: wrong data? "
                f"(pass --source / --config to choose it).")
    if knn and knn_feature == "projection":
        no_head = [m.directory for m in members if not m.spec.projection_dims]
        if no_head:
            raise EvaluationError(f"knn_feature='projection' but {', '.join(no_head)} has no "
                                  f"projection head; use knn_feature='pooled'.")

