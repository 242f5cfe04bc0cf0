"""Losses of the method, as pure functions of arrays (see docs/METHOD.md).

Shapes: B = batch, D = embedding dim (128), K = queue length, C = channels.
All losses are computed in float32 whatever the compute dtype of the model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import ndtr

OFD_STAGE_WEIGHTS = (1 / 8, 1 / 4, 1 / 2, 1.0)  # stage1..stage4, as in the released code.
OFD_NORMALISER = 1e4  # OFD's ImageNet setting: summed loss / batch / 1e4.


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along ``axis`` (torch.nn.functional.normalize), in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Mean CE of logits [B, N] against integer labels [B]; smoothing as in Inception-v3.

    With smoothing e the target is (1 - e) * onehot + e / N (torch's ``label_smoothing``).
    """
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


MASKED_LOGIT = -1e4  # Logit of an excluded negative: exp() underflows to exactly 0.


def margin_info_nce_logits(q: jax.Array, k: jax.Array, queue: jax.Array, *, margin: float,
                           temperature: float, exclude: jax.Array | None = None) -> jax.Array:
    """[B, 1 + K] logits [q.k+ - margin, q.queue_1 .. q.queue_K] / T for unit q, k [B, D], queue [K, D].

    ``exclude``: optional bool [B, K]; True drops that queue entry from that query's negatives
    (its logit becomes MASKED_LOGIT).
    """
    q, k, queue = (a.astype(jnp.float32) for a in (q, k, queue))
    positive = jnp.sum(q * k, axis=-1, keepdims=True) - margin
    negatives = q @ queue.T
    logits = jnp.concatenate([positive, negatives], axis=-1) / temperature
    if exclude is not None:
        keep = jnp.concatenate([jnp.zeros_like(exclude[:, :1]), exclude], axis=-1)
        logits = jnp.where(keep, MASKED_LOGIT, logits)
    return logits


def margin_info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, *, margin: float,
                    temperature: float,
                    exclude: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The Phase-1 loss: CE with label 0 over ``margin_info_nce_logits``; margin 0 = MoCo v2.

    Returns (mean loss, logits [B, 1 + K]).
    """
    logits = margin_info_nce_logits(q, k, queue, margin=margin, temperature=temperature,
                                    exclude=exclude)
    loss = jnp.mean(-jax.nn.log_softmax(logits, axis=-1)[:, 0])
    return loss, logits


def seed_loss(student: jax.Array, teacher: jax.Array, queue: jax.Array, *,
              student_temperature: float, teacher_temperature: float) -> jax.Array:
    """SEED: soft CE between teacher and student similarity distributions over D+ = {t} + queue.

    student, teacher: unit embeddings [B, D]; queue: teacher embeddings [K, D].
    p_T = softmax([t.t, t.queue] / tau_T), p_S = softmax([s.t, s.queue] / tau_S);
    returns mean over the batch of -sum_j p_T[j] log p_S[j].
    """
    s, t, queue = (a.astype(jnp.float32) for a in (student, teacher, queue))
    teacher = jax.lax.stop_gradient(t)
    bank_s = jnp.concatenate([jnp.sum(s * teacher, -1, keepdims=True), s @ queue.T], axis=-1)
    bank_t = jnp.concatenate([jnp.sum(teacher * teacher, -1, keepdims=True), teacher @ queue.T], -1)
    p_teacher = jax.nn.softmax(bank_t / teacher_temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(bank_s / student_temperature, axis=-1)
    return jnp.mean(-jnp.sum(p_teacher * log_p_student, axis=-1))


def l2_feature_distance(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """The paper's d: squared L2 distance of pooled features [B, C], summed over C, mean over B."""
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return jnp.mean(jnp.sum(diff * diff, axis=-1))


def relative_l2_feature_distance(student: jax.Array, teacher: jax.Array,
                                 eps: float = 1e-12) -> jax.Array:
    """Scale-free d: ||s - t||^2 / ||t||^2 per example ([B, C] pooled features), mean over B.

    The same L2 pull towards the teacher as ``l2_feature_distance`` divided by the teacher
    feature's own squared norm, so lambda does not depend on the feature width or scale.
    """
    t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    diff = student.astype(jnp.float32) - t
    return jnp.mean(jnp.sum(diff * diff, axis=-1) / jnp.maximum(jnp.sum(t * t, axis=-1), eps))


def ofd_margin(bn_scale: jax.Array, bn_bias: jax.Array) -> jax.Array:
    """OFD's per-channel margin from the teacher's last BN of a stage (gamma s, beta m), shape [C].

    E[x | x < 0] for x ~ N(m, s^2): m - s * phi(m/s) / Phi(-m/s) where Phi(-m/s) > 1e-3,
    else -3s (as in Heo et al.'s released code).
    """
    s = jnp.abs(bn_scale.astype(jnp.float32))  # torch uses gamma as the std; |.| keeps it a std.
    m = bn_bias.astype(jnp.float32)
    ratio = m / s
    cdf_neg = ndtr(-ratio)
    pdf = jnp.exp(-0.5 * ratio ** 2) / jnp.sqrt(2.0 * jnp.pi)
    safe = cdf_neg > 1e-3
    expected = m - s * pdf / jnp.where(safe, cdf_neg, 1.0)
    return jnp.where(safe, expected, -3.0 * s)


def ofd_partial_l2(student: jax.Array, teacher: jax.Array, margin: jax.Array) -> jax.Array:
    """OFD's partial L2, summed over all elements. student, teacher [B, H, W, C]; margin [C].

    The teacher target is max(t, margin); (s - t)^2 counts where s > t or t > 0.
    """
    s = student.astype(jnp.float32)
    t = jnp.maximum(jax.lax.stop_gradient(teacher).astype(jnp.float32), margin.astype(jnp.float32))
    mask = (s > t) | (t > 0)
    return jnp.sum(jnp.where(mask, (s - t) ** 2, 0.0))


def ofd_loss(student_stages, teacher_stages, margins,
             stage_weights=OFD_STAGE_WEIGHTS, normaliser: float = OFD_NORMALISER) -> jax.Array:
    """Sum over stages of weight_i * partial_L2_i, divided by batch size and by ``normaliser``.

    student_stages: connector outputs per stage [B, H, W, C_t]; teacher_stages: pre-ReLU
    teacher stage outputs of the same shapes; margins: per-stage [C_t].
    """
    batch = student_stages[0].shape[0]
    total = sum(w * ofd_partial_l2(s, t, m)
                for w, s, t, m in zip(stage_weights, student_stages, teacher_stages, margins))
    return total / batch / normaliser
