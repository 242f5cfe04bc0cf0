"""Loading pretrained encoders from checkpoints: frozen teachers and warm starts.

Any checkpoint dvp_jax writes (a workdir's ``checkpoints`` folder) or converts from PyTorch
(``python -m dvp_jax.convert_torch``) works: its meta names the model, its state holds
'params' / 'batch_stats' with a 'backbone' entry and optional 'projection' / 'classifier'.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import numpy as np

from dvp_jax import checkpoints, errors
from dvp_jax.models.spec import ModelSpec


@dataclasses.dataclass
class Pretrained:
    """A restored encoder. variables: {'params', 'batch_stats'} of host numpy arrays; spec: the
    model that holds them (heads not loaded dropped, bn_groups 1)."""
    spec: ModelSpec
    variables: dict
    meta: dict
    directory: str
    step: int

    @property
    def fingerprint(self) -> str:
        """A short hash of the params' values: identifies a teacher across resumes."""
        return params_fingerprint(self.variables["params"])

    def describe(self) -> dict:
        """What a student checkpoint records about its teacher."""
        return {"directory": self.directory, "step": self.step, "fingerprint": self.fingerprint,
                "model": self.spec.to_meta()}


class TeacherMismatchError(errors.UserError, ValueError):
    """The run being resumed was distilled from another teacher than the configured one."""


def check_same_teacher(teacher: Pretrained, config_key: str):
    """saved meta -> raises TeacherMismatchError unless it records ``teacher``'s fingerprint.

    For ``loop.Task.check_resume`` of the distilling trainers (``config_key`` names the
    setting, e.g. 'config.distill.teacher_checkpoint')."""
    current = teacher.describe()

    def check_resume(saved_meta: dict) -> None:
        saved = saved_meta.get("teacher") or {}
        if saved.get("fingerprint") != current["fingerprint"]:
            raise TeacherMismatchError(
                f"This workdir's checkpoints were distilled from the teacher at "
                f"{saved.get('directory')!r} step {saved.get('step')} (fingerprint "
                f"{saved.get('fingerprint')}), but {config_key} now gives another teacher: "
                f"{current['directory']!r} step {current['step']} (fingerprint "
                f"{current['fingerprint']}). Use another --workdir, or pin the original teacher "
                f"({config_key} and its teacher_step).")

    return check_resume


def params_fingerprint(params: Any) -> str:
    """sha1 over the leaves' paths, shapes and bytes (first 16 hex digits)."""
    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(leaf.shape).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def load(directory: str, *, keep_projection: bool, keep_classifier: bool = False,
         step: int | None = None) -> Pretrained:
    """Restores an encoder; drops the heads not asked for (and their build kwargs)."""
    meta, variables = checkpoints.load_model_variables(directory, step)
    spec = ModelSpec.from_meta(meta["model"]).replace(bn_groups=1)
    params = dict(variables["params"])
    if not keep_projection:
        params.pop("projection", None)
        spec = spec.replace(projection_dims=())
    if not keep_classifier:
        params.pop("classifier", None)
        spec = spec.replace(num_classes=0)
    used_step = checkpoints.latest_step(directory) if step is None else step
    return Pretrained(spec, {"params": params, "batch_stats": variables["batch_stats"]},
                      meta, str(directory), used_step)


def check_same_shapes(expected: Any, got: Any, what: str) -> None:
    """Raises naming the first leaf whose shape differs (e.g. a teacher of another architecture)."""
    exp = {jax.tree_util.keystr(p): np.shape(x) for p, x in
           jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): np.shape(x) for p, x in
            jax.tree_util.tree_flatten_with_path(got)[0]}
    missing = sorted(set(exp) - set(have))
    extra = sorted(set(have) - set(exp))
    if missing or extra:
        raise checkpoints.CheckpointError(
            f"{what}: the checkpoint's parameters do not match the model. Missing: "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}; unexpected: "
            f"{extra[:3]}{' ...' if len(extra) > 3 else ''}. Is it of another architecture?")
    for key in sorted(exp):
        if tuple(exp[key]) != tuple(have[key]):
            raise checkpoints.CheckpointError(
                f"{what}: parameter {key} has shape {tuple(have[key])} in the checkpoint but "
                f"{tuple(exp[key])} in the configured model. Is it of another architecture "
                "or width?")
