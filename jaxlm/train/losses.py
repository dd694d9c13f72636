"""Pure loss functions (small, composable), including TAGI's distillation terms.

Losses return a *sum* next to its weight sum (tokens, or tasks for the LoRA alignment), so a caller
can form the mean over a whole batch that was split into microbatches (accumulation == no
accumulation up to fp error); `safe_mean(total, weight)` gives the mean.

TAGI (total = w_ce L_ce + w_kl L_kl + w_ins L_ins, `combine_losses`):
  L_ce   `weighted_cross_entropy` of the student (input without the instruction, generated LoRA).
  L_kl   `kl_distillation(teacher, student, weights, T)` against a teacher that sees the instruction
         (or `topk_kl_distillation` from cached top-k teacher log-probs). Teacher and student prompts
         differ in length, so both are compared at the positions predicting the same target tokens:
             t_idx, t_ok = target_positions(teacher_weights_BxLt, n)
             s_idx, s_ok = target_positions(student_weights_BxLs, n)
             teacher = teacher_model(..., gather_index=t_idx)       # Llama: vocab projection at n rows only
             student = gather_positions(student_logits_BxLsxV, s_idx)
             total, weight = kl_distillation(teacher, student, t_ok & s_ok, T)
         (`aligned_target_logits` does the gathers when both full logit tensors exist.)
  L_ins  `lora_alignment_loss(generated, teacher_lora, task_mask_N)`: ||dW_s - dW_t||^2 per module
         through r x r Gram matrices (never d x d), normalised per module, mean over modules and tasks.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxlm.models.lora import LoraWeights

Array = jax.Array


def token_log_probs(logits_BxLxV: Array, targets_BxL: Array) -> Array:
    """log p(target) per position, computed in float32.

    Args:
      logits_BxLxV: logits (B, L, V), any float dtype.
      targets_BxL: integer target ids (B, L) in [0, V).

    Returns:
      float32 (B, L) natural-log probabilities log softmax(logits)[target].
    """
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_cross_entropy(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array) -> tuple[Array, Array]:
    """(sum of weight * -log p(target), sum of weights): zero-weight (padding) positions contribute nothing,
    even when their logits are not finite.

    Args:
      logits_BxLxV: logits (B, L, V).
      targets_BxL: integer target ids (B, L).
      weights_BxL: per-token weights (B, L), float or bool (0 on padding and non-targets).

    Returns:
      (total, weight): float32 scalars, the weighted NLL sum in nats and the weight sum;
      `safe_mean(total, weight)` is the token-weighted mean NLL.
    """
    weights_BxL = weights_BxL.astype(jnp.float32)
    nll_BxL = -token_log_probs(logits_BxLxV, targets_BxL)
    nll_BxL = jnp.where(weights_BxL > 0, nll_BxL, 0.0)
    return jnp.sum(nll_BxL * weights_BxL), jnp.sum(weights_BxL)


def safe_mean(total: Array, weight: Array) -> Array:
    """total / weight, 0 for an all-padding batch instead of NaN.

    Args:
      total: a summed loss or count (any shape).
      weight: its weight sum, broadcastable to `total`.

    Returns:
      total / weight where weight > 0, else 0.
    """
    return total / jnp.maximum(weight, 1e-9) * (weight > 0)


def token_accuracy(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array) -> tuple[Array, Array]:
    """(weighted count of argmax == target, sum of weights).

    Args:
      logits_BxLxV: logits (B, L, V) (ties go to the lowest id).
      targets_BxL: integer target ids (B, L).
      weights_BxL: per-token weights (B, L).

    Returns:
      (hits, weight): float32 scalars; `safe_mean(hits, weight)` is the token-weighted accuracy.
    """
    weights_BxL = weights_BxL.astype(jnp.float32)
    hits_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return jnp.sum(hits_BxL * weights_BxL), jnp.sum(weights_BxL)


# ---------------------------------------------------------------------------------------- distillation


def _masked_logits(logits_BxLxV: Array, keep_BxL: Array) -> Array:
    """float32 logits with non-kept rows replaced by 0, so NaN/inf there reach neither value nor gradient."""
    return jnp.where(keep_BxL[..., None], logits_BxLxV.astype(jnp.float32), 0.0)


def kl_distillation(
    teacher_logits_BxLxV: Array, student_logits_BxLxV: Array, weights_BxL: Array, temperature: float = 1.0
) -> tuple[Array, Array]:
    """(sum of weight * T^2 KL(softmax(teacher/T) || softmax(student/T)), sum of weights), float32.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.). The
    teacher is under `stop_gradient` (the loss trains the student only). Zero-weight positions
    contribute nothing, not even NaN, whatever their logits.

    Args:
      teacher_logits_BxLxV: teacher logits (B, L, V) at the same positions as the student's.
      student_logits_BxLxV: student logits (B, L, V).
      weights_BxL: per-position weights (B, L), float or bool.
      temperature: T > 0, dividing both logits.

    Returns:
      (total, weight): float32 scalars, the weighted sum of T^2 * KL (nats) and the weight sum.
    """
    weights_BxL = weights_BxL.astype(jnp.float32)
    keep_BxL = weights_BxL > 0
    t = jax.lax.stop_gradient(_masked_logits(teacher_logits_BxLxV, keep_BxL)) / temperature
    s = _masked_logits(student_logits_BxLxV, keep_BxL) / temperature
    logp_t, logp_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
    p_t = jnp.exp(logp_t)
    # p_t = 0 (a -inf teacher logit) contributes 0, not 0 * (-inf - ...) = NaN.
    kl_BxL = jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0), axis=-1)
    kl_BxL = jnp.where(keep_BxL, kl_BxL, 0.0) * (temperature**2)
    return jnp.sum(kl_BxL * weights_BxL), jnp.sum(weights_BxL)


def topk_kl_distillation(
    teacher_topk_logprobs_BxLxK: Array,
    teacher_topk_ids_BxLxK: Array,
    student_logits_BxLxV: Array,
    weights_BxL: Array,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
    """KL distillation from a cached top-k teacher (large teachers, logits precomputed on disk).

    Approximation: the teacher distribution at temperature T is taken as softmax(logp_k / T)
    renormalised over its k stored tokens (mass outside the top k is dropped), and the student keeps
    its full-vocabulary log-probs log softmax(student / T) at those ids. The term is then
    KL(q || p_s/Z) - log Z with Z the student's mass on the k ids: >= 0, zero iff the student equals
    the renormalised teacher on the support and puts no mass elsewhere; with k = V it is exactly
    `kl_distillation`. Returns (sum, weight) like the other token losses, multiplied by T^2.

    Args:
      teacher_topk_logprobs_BxLxK: the teacher's natural-log probabilities (B, L, K) of its top-k ids
        (only their differences matter: they are renormalised).
      teacher_topk_ids_BxLxK: integer ids (B, L, K) in [0, V) of those tokens.
      student_logits_BxLxV: student logits (B, L, V) at the same positions.
      weights_BxL: per-position weights (B, L), float or bool.
      temperature: T > 0.

    Returns:
      (total, weight): float32 scalars, the weighted sum of T^2 * the term above (nats) and the
      weight sum.
    """
    weights_BxL = weights_BxL.astype(jnp.float32)
    keep_BxL = weights_BxL > 0
    t = jax.lax.stop_gradient(_masked_logits(teacher_topk_logprobs_BxLxK, keep_BxL)) / temperature
    logq_BxLxK = jax.nn.log_softmax(t, axis=-1)
    logp_s = jax.nn.log_softmax(_masked_logits(student_logits_BxLxV, keep_BxL) / temperature, axis=-1)
    logp_s_BxLxK = jnp.take_along_axis(logp_s, teacher_topk_ids_BxLxK.astype(jnp.int32), axis=-1)
    q = jnp.exp(logq_BxLxK)
    kl_BxL = jnp.sum(jnp.where(q > 0, q * (logq_BxLxK - logp_s_BxLxK), 0.0), axis=-1)
    kl_BxL = jnp.where(keep_BxL, kl_BxL, 0.0) * (temperature**2)
    return jnp.sum(kl_BxL * weights_BxL), jnp.sum(weights_BxL)


def target_positions(weights_BxL: Array, num_targets: int) -> tuple[Array, Array]:
    """(index (B, T), valid (B, T)): index[b, k] is the position of row b's k-th weighted (target)
    position, in order; valid marks k < the row's number of targets (invalid indices are 0).

    Teacher rows (instruction in the prompt) and student rows (no instruction) have their targets at
    different offsets; the k-th target position of both predicts the same k-th target token.

    Args:
      weights_BxL: per-position loss weights (B, L); positions with weight > 0 are targets.
      num_targets: T, how many target positions to return per row (may exceed L).

    Returns:
      (index int32 (B, T), valid bool (B, T)); rows with more than T targets keep their first T.
    """
    keep_BxL = weights_BxL > 0
    length = weights_BxL.shape[1]
    order_L = jnp.arange(length)
    # Target positions first, in order; then the rest (also in order).
    index_BxL = jnp.argsort(jnp.where(keep_BxL, order_L, length + order_L), axis=1)
    index_BxT = index_BxL[:, :num_targets]
    if num_targets > length:
        index_BxT = jnp.pad(index_BxT, ((0, 0), (0, num_targets - length)))
    valid_BxT = jnp.arange(num_targets)[None, :] < jnp.sum(keep_BxL, axis=1, keepdims=True)
    return jnp.where(valid_BxT, index_BxT, 0).astype(jnp.int32), valid_BxT


def gather_positions(x_BxLx: Array, index_BxT: Array) -> Array:
    """x[b, index[b, t], ...] -> (B, T, ...) (logits, weights, targets at `target_positions`).

    Args:
      x_BxLx: array (B, L, ...).
      index_BxT: integer positions (B, T) in [0, L).

    Returns:
      (B, T, ...) with x's dtype.
    """
    index = index_BxT.reshape(index_BxT.shape + (1,) * (x_BxLx.ndim - 2))
    return jnp.take_along_axis(x_BxLx, index, axis=1)


def aligned_target_logits(
    teacher_logits_BxLtxV: Array, teacher_weights_BxLt: Array,
    student_logits_BxLsxV: Array, student_weights_BxLs: Array, num_targets: int,
) -> tuple[Array, Array, Array]:
    """(teacher (B, T, V), student (B, T, V), weights (B, T)) at the positions predicting the same
    target tokens; weights are the student's where both rows have a k-th target, else 0.

    To save the vocab projection on long teacher prompts, pass the teacher's `target_positions`
    index as Llama's `gather_index` instead and use `gather_positions` on the student only.

    Args:
      teacher_logits_BxLtxV: teacher logits (B, Lt, V).
      teacher_weights_BxLt: teacher loss weights (B, Lt); weight > 0 marks its target positions.
      student_logits_BxLsxV: student logits (B, Ls, V).
      student_weights_BxLs: student loss weights (B, Ls).
      num_targets: T, target positions compared per row.

    Returns:
      (teacher logits (B, T, V), student logits (B, T, V), weights (B, T) in the student weights' dtype).
    """
    t_index, t_valid = target_positions(teacher_weights_BxLt, num_targets)
    s_index, s_valid = target_positions(student_weights_BxLs, num_targets)
    weights_BxT = jnp.where(t_valid & s_valid, gather_positions(student_weights_BxLs, s_index), 0)
    return (gather_positions(teacher_logits_BxLtxV, t_index), gather_positions(student_logits_BxLsxV, s_index),
            weights_BxT)


def _lora_modules(lora: LoraWeights) -> dict[tuple[str, ...], Mapping]:
    """{path: {'a', 'b'}} of every adapted module of a LoraWeights tree."""
    out: dict[tuple[str, ...], Mapping] = {}

    def walk(tree: Mapping, path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping) and set(value) == {"a", "b"}:
                out[path + (key,)] = value
            elif isinstance(value, Mapping):
                walk(value, path + (key,))

    walk(lora.params, ())
    return out


def lora_sq_distance(student: LoraWeights, teacher: LoraWeights) -> dict[tuple[str, ...], Array]:
    """{module path: ||dW_s - dW_t||_F^2} with dW = (alpha/r) A @ B, through r x r Grams only:

        s^2 tr(As^T As . Bs Bs^T) - 2 s t tr(As^T At . Bt Bs^T) + t^2 tr(At^T At . Bt Bt^T)

    (never a d x d matrix; O(d r^2)). Ranks may differ; leaves may carry a leading task axis N
    (then each value is (N,)); an unbatched side broadcasts against a batched one.

    Args:
      student: adapter with leaves (D_in, r_s) / (r_s, D_out), or (N, ...).
      teacher: adapter of the same modules, leaves (D_in, r_t) / (r_t, D_out), or (N, ...).

    Returns:
      {module path tuple: float32 () or (N,)} squared Frobenius distances, clamped at >= 0.

    Raises:
      ValueError: the two adapters do not adapt the same modules.
    """
    s_mod, t_mod = _lora_modules(student), _lora_modules(teacher)
    if set(s_mod) != set(t_mod):
        only_s, only_t = sorted(set(s_mod) - set(t_mod)), sorted(set(t_mod) - set(s_mod))
        raise ValueError(f"LoRA alignment: modules differ (student only: {only_s}, teacher only: {only_t})")
    ss, ts = student.scale, teacher.scale
    out = {}
    for path, s in s_mod.items():
        t = t_mod[path]
        a_s, b_s, a_t, b_t = s["a"], s["b"], t["a"], t["b"]
        self_s, self_t = _gram_inner(a_s, b_s, a_s, b_s), _gram_inner(a_t, b_t, a_t, b_t)
        cross = _gram_inner(a_s, b_s, a_t, b_t)
        out[path] = jnp.maximum(ss * ss * self_s - 2.0 * ss * ts * cross + ts * ts * self_t, 0.0)
    return out


def _gram_inner(a1: Array, b1: Array, a2: Array, b2: Array) -> Array:
    """<A1 B1, A2 B2>_F = tr(A1^T A2 . B2 B1^T) = sum((A1^T A2) * (B1 B2^T)) over r1 x r2 matrices.

    float32 at full precision (no TF32/bf16 passes on accelerators): the distance is a difference
    of these terms and cancels when student ~ teacher; they cost O(d r^2), so precision is free."""
    f32 = lambda x: x.astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    g_a = jnp.einsum("...dr,...dq->...rq", f32(a1), f32(a2), precision=highest)
    g_b = jnp.einsum("...rk,...qk->...rq", f32(b1), f32(b2), precision=highest)
    return jnp.sum(g_a * g_b, axis=(-2, -1))


def lora_sq_norm(lora: LoraWeights) -> dict[tuple[str, ...], Array]:
    """{module path: ||dW||_F^2} via the r x r Grams (the teacher term of `lora_sq_distance`).

    Args:
      lora: adapter with leaves (D_in, r) / (r, D_out), or (N, ...).

    Returns:
      {module path tuple: float32 () or (N,)} with dW = (alpha/r) A @ B.
    """
    return {path: lora.scale**2 * _gram_inner(m["a"], m["b"], m["a"], m["b"]) for path, m in _lora_modules(lora).items()}


def lora_task_share(lora_G: LoraWeights) -> Array:
    """The fraction of a batch of adapters' ||dW||^2 that differs between tasks, over all modules:

        sum_modules sum_g ||dW_g - mean_h dW_h||^2  /  sum_modules sum_g ||dW_g||^2

    through the (G, G, r, r) Grams of every pair of tasks (never a d x d matrix). 0 when every task
    gets the same adapter (or all are zero); 1 - 1/G for orthogonal adapters, 1 when they cancel (mean 0).

    Args:
      lora_G: adapters with a leading task axis, leaves (G, D_in, r) / (G, r, D_out).

    Returns:
      float32 () in [0, 1].
    """
    between, total = jnp.float32(0.0), jnp.float32(0.0)
    for m in _lora_modules(lora_G).values():
        a, b = m["a"], m["b"]  # every pair of tasks: <dW_g, dW_h> for g, h in G x G
        inner_GxG = _gram_inner(a[:, None], b[:, None], a[None], b[None]) * lora_G.scale**2
        sq = jnp.trace(inner_GxG)
        between = between + sq - jnp.sum(inner_GxG) / inner_GxG.shape[0]
        total = total + sq
    return jnp.where(total > 0, jnp.maximum(between, 0.0) / jnp.maximum(total, 1e-30), 0.0)


def lora_alignment_loss(
    student: LoraWeights, teacher: LoraWeights, task_mask_N: Array | None = None, normalize: str = "module", eps: float = 1e-6
) -> tuple[Array, Array]:
    """(sum over tasks of the module-mean normalised ||dW_s - dW_t||^2, number of tasks) -> safe_mean.

    normalize: "module" divides each module's distance by ||dW_t||^2 + eps (every module counts the
    same whatever its norm; 1.0 = as far as a zero adapter), "mean" by the task's mean over modules
    of ||dW_t||^2 + eps (robust to a near-zero teacher module), "none" keeps raw distances.
    `task_mask_N` (bool/float, (N,)) drops tasks without a LoRA teacher. Unbatched adapters count as
    one task.

    Args:
      student: generated adapter, leaves (N, D_in, r_s) / (N, r_s, D_out) (or unbatched).
      teacher: teacher adapter of the same modules, (N, ...) or unbatched.
      task_mask_N: (N,) weight of each task (> 0 keeps it), or None for all.
      normalize: "module", "mean" or "none" (above).
      eps: added to the normaliser.

    Returns:
      (total, count): float32 scalars, the mask-weighted sum over tasks of the module-mean
      (normalised) distance, and the mask sum; `safe_mean(total, count)` is the per-task mean.

    Raises:
      ValueError: an unknown `normalize`, or the adapters do not adapt the same modules.
    """
    if normalize not in ("module", "mean", "none"):
        raise ValueError(f"lora_alignment_loss: normalize={normalize!r}, expected 'module', 'mean' or 'none'")
    dist = lora_sq_distance(student, teacher)
    paths = sorted(dist)
    dist_MxN = jnp.stack([jnp.atleast_1d(dist[p]) for p in paths])
    if normalize != "none":
        norms = lora_sq_norm(teacher)
        norm_MxN = jnp.broadcast_to(jnp.stack([jnp.atleast_1d(norms[p]) for p in paths]), dist_MxN.shape)
        if normalize == "mean":
            norm_MxN = jnp.broadcast_to(jnp.mean(norm_MxN, axis=0, keepdims=True), dist_MxN.shape)
        dist_MxN = dist_MxN / (norm_MxN + eps)
    per_task_N = jnp.mean(dist_MxN, axis=0)
    mask_N = jnp.ones_like(per_task_N) if task_mask_N is None else task_mask_N.astype(jnp.float32)
    per_task_N = jnp.where(mask_N > 0, per_task_N, 0.0)
    return jnp.sum(per_task_N * mask_N), jnp.sum(mask_N)


def combine_losses(terms: dict[str, Array], weights: dict[str, float]) -> tuple[Array, dict[str, Array]]:
    """(sum of weights[k] * terms[k], metrics): every term is logged as `loss_<name>` (also those with
    weight 0 or no weight); the total is not in `metrics` (the train step logs it as `loss`).
    A weight naming no term is an error.

    Args:
      terms: {name: scalar loss}, e.g. {'ce': ..., 'kl': ...}.
      weights: {name: weight}; terms without a weight, or with weight 0, are not added.

    Returns:
      (total float32 scalar, {'loss_<name>': term for every term}).

    Raises:
      ValueError: a weight names no term.
    """
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(f"loss weights {unknown} name no loss term (terms: {sorted(terms)})")
    total = jnp.zeros((), jnp.float32)
    for name, w in weights.items():
        if w:
            total = total + w * terms[name].astype(jnp.float32)
    return total, {f"loss_{name}": value for name, value in terms.items()}
