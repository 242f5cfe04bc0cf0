"""Value checks run before any work: a bad value fails naming its key and what is allowed.

Unknown keys and wrong types are already refused by ml_collections when ``--config.a.b=v``
overrides are parsed (every key exists in the config file with a typed default); this module
checks the values themselves. Combinations that need the devices (global batch vs device
count) are checked by the trainers via ``dvp_jax.sharding.check_global_batch``.
"""
from __future__ import annotations

from typing import Any, Callable

from dvp_jax import choices, registry
from dvp_jax.errors import ConfigError

SOURCE_KINDS = ("digits", "synthetic", "tfds:NAME", "folder:PATH")


def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _source_ok(source: str) -> bool:
    return source in ("digits", "synthetic") or (
        any(source.startswith(p) for p in ("tfds:", "folder:")) and len(source.split(":", 1)[1]) > 0)


def _one_of(values) -> tuple[Callable[[Any], bool], str]:
    """(test, words) of a rule allowing exactly ``values``: "'a', 'b' or 'c'"."""
    names = [repr(v) for v in values]
    words = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return (lambda v: v in tuple(values)), words


def _rules() -> list[tuple[str, Callable[[Any], bool], str]]:
    from dvp_jax import models
    positive = (lambda v: v > 0, "a number > 0")
    return [
        ("trainer", lambda v: v in registry.TRAINERS, f"one of {', '.join(registry.TRAINERS)}"),
        ("experiment", lambda v: v in registry.EXPERIMENTS,
         f"one of {', '.join(registry.EXPERIMENTS)}"),
        ("model.name", lambda v: v in models.NAMES, f"one of {', '.join(models.NAMES)}"),
        ("model.dtype", *_one_of(choices.DTYPES)),
        ("model.width_multiplier", *positive),
        ("optim.schedule", *_one_of(choices.SCHEDULES)),
        ("optim.base_lr", lambda v: v >= 0, "a number >= 0"),
        ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
        ("input.source", _source_ok, f"one of {', '.join(SOURCE_KINDS)}"),
        ("input.image_size", *positive),
        ("input.auto_augment", *_one_of(choices.AUTO_AUGMENT)),
        ("input.augment_on", *_one_of(choices.AUGMENT_ON)),
        ("input.cutout", lambda v: v >= 0, "an integer >= 0 (pixels; 0 = off)"),
        ("batch_size", *positive),
        ("num_epochs", *positive),
        ("loop.checkpoint_every_steps", *positive),
        ("loop.log_every_steps", *positive),
        ("loop.keep_checkpoints", *positive),
        ("moco.shuffle_bn", *_one_of(choices.SHUFFLE_BN_MODES)),
        ("moco.temperature", *positive),
        ("moco.queue_size", *positive),
        ("moco.momentum", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        ("moco.margin_warmup_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
        ("moco.bn_groups", lambda v: v >= 0, "an integer >= 0 (0 = auto)"),
        ("input.moco_crop_scale", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
         "(min, max) with 0 < min <= max <= 1"),
        ("knn.feature", *_one_of(choices.KNN_FEATURES)),
        ("knn.k", *positive),
        ("seed_distill.queue_size", *positive),
        ("seed_distill.student_temperature", *positive),
        ("seed_distill.teacher_temperature", *positive),
        ("seed_distill.hidden_dim", lambda v: v >= 0, "an integer >= 0 (0 = the backbone's dim)"),
        ("seed_distill.bn_groups", lambda v: v >= 0, "an integer >= 0 (0 = one per data shard)"),
        ("seed_distill.augmentation", *_one_of(choices.SEED_DISTILL_AUGMENTATIONS)),
        ("classify.label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("classify.linear_init_std", *positive),
        ("classify.mixup_alpha", lambda v: v >= 0, "a number >= 0 (0 = no mixup; the release's --mixup: 1)"),
        ("model.variant", *_one_of(choices.MODEL_VARIANTS)),
        ("distill.kind", _one_of(choices.DISTILL_KINDS)[0],
         "'l2' (paper text), 'l2_relative' (scale-free) or 'ofd' (released code)"),
        ("distill.teacher_bn", *_one_of(choices.DISTILL_TEACHER_BN)),
        ("distill.student_init", *_one_of(choices.DISTILL_STUDENT_INIT)),
        ("distill.weight", lambda v: v >= 0, "a number >= 0"),
        ("distill.start_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ]


def check_multiple(key: str, value: int, of_key: str, of_value: int, why: str) -> None:
    """Refuses ``config.key=value`` unless it is a positive multiple of ``config.of_key``."""
    if of_value > 0 and (value <= 0 or value % of_value):
        raise ConfigError(
            f"config.{key}={value} is not a multiple of config.{of_key}={of_value}; {why}. Use "
            f"e.g. {key}={max(1, value // of_value) * of_value}.")


def check_divides(key: str, value: int, of_key: str, of_value: int, why: str) -> None:
    """Refuses ``config.of_key=of_value`` unless ``value`` (> 0) divides it."""
    if value > 0 and of_value % value:
        raise ConfigError(f"config.{of_key}={of_value} is not divisible by config.{key}={value} "
                          f"({why}).")


def _cross_rules(config) -> list[str]:
    """Rules between keys (each trainer also calls the matching check_* itself)."""
    problems = []
    batch = _get(config, "batch_size")
    checks = [
        (check_multiple, "moco.queue_size", "the queue is written a whole global batch at a time"),
        (check_multiple, "seed_distill.queue_size",
         "the queue is written a whole global batch at a time"),
        (check_divides, "moco.bn_groups", "every BN group gets the same number of images"),
        (check_divides, "seed_distill.bn_groups", "every BN group gets the same number of images"),
    ]
    if not isinstance(batch, int) or batch <= 0:
        return problems
    for check, key, why in checks:
        value = _get(config, key)
        if value is _MISSING or not isinstance(value, int):
            continue
        try:
            check(key, value, "batch_size", batch, why)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def validate(config) -> None:
    """Raises ConfigError naming every bad key, its value and what is allowed."""
    problems = []
    for key, ok, allowed in _rules():
        value = _get(config, key)
        if value is _MISSING or value is None:  # None: an unset placeholder (table1's loop).
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            problems.append(f"config.{key}={value!r} is not allowed; use {allowed}.")
    if not problems:
        problems = _cross_rules(config)
    if problems:
        raise ConfigError("\n".join(problems))
