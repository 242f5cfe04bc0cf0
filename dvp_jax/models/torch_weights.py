"""PyTorch state_dict -> Flax variables of ``dvp_jax.models`` (numpy in, numpy out).

Layouts understood (the prefix is auto-detected, see ``KNOWN_PREFIXES``):
  * plain torchvision: conv1.weight, bn1.running_mean, layer1.0.conv1.weight, ..., fc.weight
    (fc -> params['classifier']); for mobilenet_v3_large / efficientnet_b0 torchvision's
    features.* / classifier.* keys.
  * MoCo: {'state_dict': {'module.encoder_q.conv1.weight', ..., 'module.encoder_q.fc.0.weight',
    'module.encoder_q.fc.2.weight'}}: the MLP fc.0 / fc.2 (/ fc.4 ...) -> params['projection'].
  * SEED: 'module.student.*' (MLP fc.0 / fc.2 -> 'projection').
  * The DVP student (OFD's Distiller: 'module.s_net.*'; or 'module.', 'student.', 'model.').
Keys outside the chosen prefix (momentum encoder, teacher, queue, connectors) are ignored.

Tensor layouts: conv OIHW -> HWIO, linear [out, in] -> [in, out]; BN weight / bias /
running_mean / running_var -> params scale / bias, batch_stats mean / var;
num_batches_tracked is ignored. Every other unmatched key, every missing key and every shape
mismatch raises ``ConversionError`` naming the key and both shapes.

torch is imported only by ``load_torch_state_dict``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dvp_jax import errors, models
from dvp_jax.models import resnet

# Searched in this order when several prefixes hold a whole backbone (e.g. MoCo's encoder_q
# and encoder_k, SEED's student and teacher, OFD's s_net and t_net).
KNOWN_PREFIXES: tuple[str, ...] = (
    "module.encoder_q.", "encoder_q.", "module.student.", "student.", "module.s_net.", "s_net.",
    "module.model.", "model.", "module.", "")

_IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(errors.UserError, ValueError):
    """A state_dict does not fit the requested architecture."""


def _family(arch: str) -> str:
    if arch not in models.NAMES:
        raise ConversionError(f"Unknown arch {arch!r}; allowed names: {', '.join(models.NAMES)}.")
    if arch in resnet.CONFIGS:
        return "resnet"
    return arch


def _anchors(arch: str) -> tuple[str, ...]:
    """Keys (without prefix) that every checkpoint of ``arch`` has."""
    if _family(arch) == "resnet":
        return ("layer1.0.conv1.weight", "conv1.weight", "bn1.running_mean")
    return ("features.0.0.weight", "features.0.1.running_mean")


def detect_prefix(keys, arch: str) -> str:
    """The key prefix under which the backbone of ``arch`` sits (see ``KNOWN_PREFIXES``).

    Raises ConversionError when no prefix holds the backbone, or several do and none of them
    is a known one."""
    keys = set(keys)
    first, *others = _anchors(arch)
    candidates = sorted({k[: len(k) - len(first)] for k in keys if k.endswith(first)})
    candidates = [p for p in candidates if all(p + a in keys for a in others)]
    if not candidates:
        raise ConversionError(
            f"No {arch} backbone found in the state_dict: no key ends with {first!r} "
            f"(with {', '.join(repr(a) for a in others)} beside it). First keys: "
            f"{sorted(keys)[:8]}")
    if len(candidates) == 1:
        return candidates[0]
    for p in KNOWN_PREFIXES:
        if p in candidates:
            return p
    raise ConversionError(
        f"Several {arch} backbones in the state_dict, under prefixes {candidates}; "
        f"pass one explicitly (--prefix).")


def strip_prefix(state_dict: dict[str, Any], arch: str,
                 prefix: str = "auto") -> tuple[dict[str, Any], str]:
    """(the entries under ``prefix`` with it removed, the prefix used). 'auto' detects it."""
    if prefix == "auto":
        prefix = detect_prefix(state_dict.keys(), arch)
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        raise ConversionError(f"No key starts with prefix {prefix!r}.")
    return sub, prefix


def _infer_kwargs(sd: dict[str, np.ndarray], arch: str, num_classes: int | None) -> dict:
    """build() kwargs (without 'name') from the shapes of a prefix-free state_dict."""
    fam = _family(arch)
    kwargs: dict[str, Any] = dict(num_classes=0, projection_dims=[], bn_groups=1,
                                  small_stem=False, width_multiplier=1.0, dtype="float32",
                                  zero_init_residual=False)
    missing = [a for a in _anchors(arch) if a not in sd]
    if missing:
        raise ConversionError(f"missing key {missing[0]!r}: not a {arch} state_dict (or a "
                              f"wrong prefix). First keys: {sorted(sd)[:8]}")
    if fam == "resnet":
        w = np.shape(sd["conv1.weight"])          # [w0, 3, k, k]
        kwargs["small_stem"] = bool(w[2] == 3)
        kwargs["width_multiplier"] = float(w[0]) / 64.0 if w[0] != 64 else 1.0
        if "fc.weight" in sd:
            kwargs["num_classes"] = int(np.shape(sd["fc.weight"])[0])
        mlp = sorted(int(m.group(1)) for k in sd
                     if (m := re.fullmatch(r"fc\.(\d+)\.weight", k)))
        if mlp:
            if mlp != list(range(0, 2 * len(mlp), 2)):
                raise ConversionError(
                    f"MLP head layers at fc.{mlp}: expected Linear layers at fc.0, fc.2, ... "
                    f"(Linear, ReLU, Linear, ...).")
            kwargs["projection_dims"] = [int(np.shape(sd[f"fc.{i}.weight"])[0]) for i in mlp]
    else:
        cls_key = "classifier.3.weight" if fam == "mobilenet_v3_large" else "classifier.1.weight"
        if cls_key in sd:
            kwargs["num_classes"] = int(np.shape(sd[cls_key])[0])
    if num_classes is not None:
        have = kwargs["num_classes"]
        if have and num_classes and have != num_classes:
            raise ConversionError(
                f"num_classes={num_classes} was requested but the checkpoint's classifier has "
                f"{have} outputs.")
        kwargs["num_classes"] = int(num_classes)
    return kwargs


def _torch_module(path: tuple[str, ...], arch: str, siblings: dict) -> str:
    """Torch module name of the flax module at ``path`` (top-level name first).

    ``siblings`` is the flax params tree, used to find the position of a block's sub-layers
    in torchvision's ``block`` Sequential (expand / se are present only in some blocks)."""
    fam = _family(arch)
    top, rest = path[0], path[1:]
    if top == "classifier":
        return {"resnet": "fc", "mobilenet_v3_large": "classifier.3",
                "efficientnet_b0": "classifier.1"}[fam]
    if top == "projection":
        if fam != "resnet":
            raise ConversionError(f"Projection heads are converted for ResNets only, not {arch}.")
        return f"fc.{2 * int(rest[0][len('dense'):])}"
    assert top == "backbone", path
    if fam == "resnet":
        if len(rest) == 1:
            return rest[0]                                    # conv1, bn1
        m = re.fullmatch(r"layer(\d+)_(\d+)", rest[0])
        sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
            rest[1], rest[1])
        return f"layer{m.group(1)}.{m.group(2)}.{sub}"
    if rest[0] == "classifier_0":
        return "classifier.0"
    feat = rest[0][len("features_"):].replace("_", ".")       # '3' or '2.1'
    if len(rest) == 2:                                        # stem / last conv: ConvBNAct
        return f"features.{feat}.{ {'conv': '0', 'bn': '1'}[rest[1]] }"
    order = [n for n in ("expand", "depthwise", "se", "project") if n in siblings[rest[0]]]
    leaf = {"conv": "0", "bn": "1"}.get(rest[2], rest[2])     # fc1 / fc2 stay
    return f"features.{feat}.block.{order.index(rest[1])}.{leaf}"


_LEAF = {("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_leaf(collection: str, leaf: str) -> str:
    if collection == "params" and leaf == "kernel":
        return "weight"
    return _LEAF[(collection, leaf)]


def _to_flax(x: np.ndarray, collection: str, leaf: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if collection == "params" and leaf == "kernel":
        if x.ndim == 4:
            return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))   # OIHW -> HWIO
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)                              # [out,in] -> [in,out]
    return x


def _expected_torch_shape(shape: tuple[int, ...], collection: str, leaf: str) -> tuple[int, ...]:
    if collection == "params" and leaf == "kernel":
        if len(shape) == 4:
            h, w, i, o = shape
            return (o, i, h, w)
        if len(shape) == 2:
            return (shape[1], shape[0])
    return tuple(shape)


def variables_template(arch: str, model_kwargs: dict) -> dict:
    """ShapeDtypeStructs of the variables of ``build(arch, **model_kwargs)`` (no compute)."""
    model = models.build(arch, **model_kwargs)
    res = 32 if model_kwargs.get("small_stem") else 64
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))


def torch_state_dict_to_flax(state_dict: dict[str, np.ndarray], arch: str, *,
                             prefix: str = "auto", num_classes: int | None = None,
                             ) -> tuple[dict, dict]:
    """Maps a torchvision-style state_dict onto the variables of ``models.build(arch, ...)``.

    Args:
      state_dict: name -> numpy array (torch layouts), possibly prefixed (see module doc).
      arch: a name of ``models.NAMES``.
      prefix: the key prefix of the backbone, or 'auto' (``detect_prefix``).
      num_classes: None keeps the checkpoint's classifier (if any); N > 0 requires it to have
        N outputs, or adds a freshly initialised one (torch's default Linear init, seed 0) when
        the checkpoint has none; 0 drops it.
    Returns:
      (variables {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays,
       model_kwargs): ``models.build(arch, **model_kwargs)`` is the matching model.
    Raises:
      ConversionError naming the key (and both shapes) on missing / unexpected keys and shape
      mismatches.
    """
    sd, _ = strip_prefix(state_dict, arch, prefix)
    kwargs = _infer_kwargs(sd, arch, num_classes)
    cls_prefix = _torch_module(("classifier",), arch, {})
    fresh_classifier = kwargs["num_classes"] > 0 and f"{cls_prefix}.weight" not in sd
    if kwargs["num_classes"] == 0:   # drop a classifier the caller does not want
        sd = {k: v for k, v in sd.items() if k not in (f"{cls_prefix}.weight",
                                                        f"{cls_prefix}.bias")}

    template = variables_template(arch, kwargs)
    flat = traverse_util.flatten_dict(
        {"params": template["params"], "batch_stats": template.get("batch_stats", {})})
    params_tree = template["params"]["backbone"]

    out: dict[tuple[str, ...], np.ndarray] = {}
    used: set[str] = set()
    problems: list[str] = []
    for path, spec in flat.items():
        collection, modpath, leaf = path[0], path[1:-1], path[-1]
        if fresh_classifier and modpath == ("classifier",):
            continue
        name = (f"{_torch_module(modpath, arch, params_tree)}."
                f"{_torch_leaf(collection, leaf)}")
        flax_name = "/".join(path)
        want = _expected_torch_shape(spec.shape, collection, leaf)
        if name not in sd:
            problems.append(f"missing key {name!r} (expected shape {want}, for flax "
                            f"{flax_name!r})")
            continue
        have = tuple(np.shape(sd[name]))
        used.add(name)
        if have != want:
            problems.append(f"shape mismatch for key {name!r}: checkpoint {have}, expected "
                            f"{want} (flax {flax_name!r} {tuple(spec.shape)})")
            continue
        out[path] = _to_flax(sd[name], collection, leaf)
    unexpected = sorted(k for k in sd if k not in used
                        and not k.endswith(_IGNORED_SUFFIXES))
    problems += [f"unexpected key {k!r} (shape {tuple(np.shape(sd[k]))})" for k in unexpected]
    if problems:
        more = f" ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConversionError(f"Cannot convert the state_dict to {arch} "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems[:20])
                              + more)

    variables = traverse_util.unflatten_dict(out)
    if fresh_classifier:
        c = template["params"]["classifier"]["kernel"].shape[0]
        init = models.Classifier(kwargs["num_classes"]).init(
            jax.random.key(0), jnp.zeros((1, c), jnp.float32))
        variables["params"]["classifier"] = jax.tree.map(np.asarray, init["params"])
    variables.setdefault("batch_stats", {})
    return variables, kwargs


def flax_to_torch_state_dict(variables: dict, arch: str) -> dict[str, np.ndarray]:
    """The inverse mapping: variables of a ``build(arch, ...)`` model -> torchvision-named
    numpy state_dict (HWIO -> OIHW, [in, out] -> [out, in]; no num_batches_tracked)."""
    _family(arch)
    flat = traverse_util.flatten_dict(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
    backbone = variables["params"]["backbone"]
    out = {}
    for path, x in flat.items():
        collection, modpath, leaf = path[0], path[1:-1], path[-1]
        x = np.asarray(x, dtype=np.float32)
        if collection == "params" and leaf == "kernel":
            x = np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
        out[f"{_torch_module(modpath, arch, backbone)}.{_torch_leaf(collection, leaf)}"] = (
            np.ascontiguousarray(x))
    return out


def load_torch_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a .pth / .pth.tar file into name -> float32 numpy arrays (needs torch).

    Unwraps {'state_dict': ...} (MoCo, SEED, OFD), {'model': ...} and {'student': ...}.
    ``allow_pickle`` loads arbitrary pickles (torch.load(weights_only=False)): trusted files
    only."""
    import torch  # Only here: the rest of dvp_jax runs without torch.

    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=not allow_pickle)
    for key in ("state_dict", "model", "student"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state_dict.")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def convert_checkpoint(torch_path: str, arch: str, out_dir: str, *,
                       num_classes: int | None = None, prefix: str = "auto",
                       allow_pickle: bool = False) -> dict:
    """Converts a PyTorch checkpoint file into a dvp_jax checkpoint directory (step 0).

    Returns the meta written: {'trainer': 'converted', 'model': {'name': arch, **build
    kwargs}, 'source': torch_path, 'prefix': the prefix used}."""
    from dvp_jax import checkpoints

    state_dict = load_torch_state_dict(torch_path, allow_pickle=allow_pickle)
    _family(arch)
    _, used_prefix = strip_prefix(state_dict, arch, prefix)
    variables, kwargs = torch_state_dict_to_flax(state_dict, arch, prefix=used_prefix,
                                                 num_classes=num_classes)
    meta = {"trainer": "converted", "model": {"name": arch, **kwargs},
            "source": os.fspath(torch_path), "prefix": used_prefix}
    mngr = checkpoints.manager(out_dir)
    if mngr.latest_step() is not None:
        raise ConversionError(f"{out_dir!r} already holds a checkpoint (step "
                              f"{mngr.latest_step()}); choose another --out.")
    checkpoints.save(mngr, 0, {"params": variables["params"],
                               "batch_stats": variables["batch_stats"]}, meta)
    mngr.wait_until_finished()
    mngr.close()
    return meta
