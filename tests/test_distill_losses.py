"""Distillation terms: KL (full and top-k), target alignment, LoRA Gram distance, combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import lora as lora_lib
from jaxlm.models.lora import LoraWeights
from jaxlm.train import losses


def _np_kl(teacher, student, temperature):
    """Reference T^2 KL(softmax(t/T) || softmax(s/T)) per position, float64 numpy."""
    t = np.asarray(teacher, np.float64) / temperature
    s = np.asarray(student, np.float64) / temperature
    logp_t = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    logp_s = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    return temperature**2 * (np.exp(logp_t) * (logp_t - logp_s)).sum(-1)


def _logits(seed, shape, scale=3.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# Jitted once per shape: eager JAX dispatches (and compiles) every small op separately.
kl = jax.jit(losses.kl_distillation, static_argnames="temperature")
topk_kl = jax.jit(losses.topk_kl_distillation, static_argnames="temperature")
sq_distance = jax.jit(losses.lora_sq_distance)
alignment = jax.jit(losses.lora_alignment_loss, static_argnames=("normalize", "eps"))
target_positions = jax.jit(losses.target_positions, static_argnames="num_targets")
aligned = jax.jit(losses.aligned_target_logits, static_argnames="num_targets")


def test_kl_zero_for_identical_logits_and_hand_value():
    logits = _logits(0, (2, 5, 11))
    total, weight = kl(logits, logits, jnp.ones((2, 5)), temperature=2.0)
    assert abs(float(total)) < 1e-5 and float(weight) == 10.0
    # Two-way distributions by hand: p = (0.5, 0.5), q = (0.2, 0.8): KL = 0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.8).
    teacher = jnp.zeros((1, 1, 2))
    student = jnp.log(jnp.array([[[0.2, 0.8]]]))
    total, _ = kl(teacher, student, jnp.ones((1, 1)), temperature=1.0)
    assert float(total) == pytest.approx(0.5 * np.log(2.5) + 0.5 * np.log(0.625), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_reference_with_t_squared(temperature):
    teacher, student = _logits(1, (3, 4, 9)), _logits(2, (3, 4, 9))
    weights = jnp.array([[1, 1, 0, 0], [1, 2, 1, 0], [0, 0, 0, 0]], jnp.float32)
    total, weight = kl(teacher, student, weights, temperature)
    ref = _np_kl(teacher, student, temperature)
    assert float(total) == pytest.approx(float((ref * np.asarray(weights)).sum()), rel=1e-5)
    assert float(weight) == 6.0
    # T^2: the same per-position KL of the tempered distributions, scaled.
    unscaled, _ = kl(teacher / temperature, student / temperature, weights, 1.0)
    assert float(total) == pytest.approx(temperature**2 * float(unscaled), rel=1e-5)


def test_kl_padding_does_not_leak_values_or_gradients():
    teacher, student = _logits(3, (2, 4, 7)), _logits(4, (2, 4, 7))
    weights = jnp.array([[1, 1, 1, 0], [0, 1, 1, 0]], jnp.float32)
    pad = ~(weights > 0)
    bad_teacher = jnp.where(pad[..., None], jnp.nan, teacher)
    bad_student = jnp.where(pad[..., None], jnp.inf, student).at[0, 3, 0].set(jnp.nan)
    clean, _ = kl(teacher, student, weights)
    dirty, _ = kl(bad_teacher, bad_student, weights)
    assert float(dirty) == pytest.approx(float(clean), rel=1e-6)
    grad = jax.grad(lambda s: kl(bad_teacher, s, weights)[0])(bad_student)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad[pad]).max()) == 0.0
    # A -inf teacher logit (token ruled out) at a real position is a zero-probability term, not NaN.
    ruled_out = teacher.at[0, 0, 2].set(-jnp.inf)
    total, _ = kl(ruled_out, student, weights)
    assert bool(jnp.isfinite(total))
    # The teacher is under stop_gradient.
    g_teacher = jax.grad(lambda t: kl(t, student, weights)[0])(teacher)
    assert float(jnp.abs(g_teacher).max()) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_full_support_equals_kl(temperature):
    teacher, student = _logits(5, (2, 3, 8)), _logits(6, (2, 3, 8))
    weights = jnp.array([[1, 1, 0], [1, 0, 1]], jnp.float32)
    logp = jax.nn.log_softmax(teacher, axis=-1)
    ids = jnp.argsort(-logp, axis=-1)  # all V ids, best first (order must not matter)
    topk = jnp.take_along_axis(logp, ids, axis=-1)
    full, _ = kl(teacher, student, weights, temperature)
    approx, weight = topk_kl(topk, ids, student, weights, temperature)
    assert float(approx) == pytest.approx(float(full), rel=1e-5) and float(weight) == 4.0
    # Truncated support: still >= 0, and 0 only when the student is the renormalised teacher.
    k = 3
    approx_k, _ = topk_kl(topk[..., :k], ids[..., :k], student, weights, temperature)
    assert float(approx_k) > 0
    on_support = jnp.full_like(teacher, -1e9)
    on_support = jnp.put_along_axis(on_support, ids[..., :k], topk[..., :k], axis=-1, inplace=False)
    exact, _ = topk_kl(topk[..., :k], ids[..., :k], on_support, weights, temperature)
    assert abs(float(exact)) < 1e-4


def test_target_positions_align_longer_teacher_prompt():
    """Teacher rows carry the instruction (longer prompt, targets later); the k-th target position of
    both rows predicts the same k-th target token."""
    targets = [[5, 6, 7], [8, 9]]
    student_w = np.zeros((2, 6), np.float32)
    teacher_w = np.zeros((2, 10), np.float32)
    student_tok = np.zeros((2, 6), np.int32)
    teacher_tok = np.zeros((2, 10), np.int32)
    for b, tgt in enumerate(targets):
        s0, t0 = 2 + b, 6 + b  # prompt lengths differ per row and between teacher and student
        student_w[b, s0:s0 + len(tgt)] = 1
        teacher_w[b, t0:t0 + len(tgt)] = 1
        student_tok[b, s0:s0 + len(tgt)] = tgt
        teacher_tok[b, t0:t0 + len(tgt)] = tgt
    t_idx, t_valid = target_positions(jnp.asarray(teacher_w), 4)
    s_idx, s_valid = target_positions(jnp.asarray(student_w), 4)
    np.testing.assert_array_equal(np.asarray(t_valid), [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(t_idx)[0, :3], [6, 7, 8])
    both = np.asarray(t_valid & s_valid)
    t_tok = np.asarray(losses.gather_positions(jnp.asarray(teacher_tok), t_idx))
    s_tok = np.asarray(losses.gather_positions(jnp.asarray(student_tok), s_idx))
    np.testing.assert_array_equal(t_tok[both], s_tok[both])
    assert t_tok[both].tolist() == [5, 6, 7, 8, 9]

    # aligned_target_logits: teacher logits that are the student's shifted by the prompt offset give KL 0.
    student_logits = _logits(7, (2, 6, 5))
    teacher_logits = jnp.pad(student_logits, ((0, 0), (4, 0), (0, 0)))  # offset 4 = instruction length
    t, s, w = aligned(teacher_logits, jnp.asarray(teacher_w), student_logits, jnp.asarray(student_w), 4)
    assert t.shape == (2, 4, 5) and np.asarray(w).tolist() == both.astype(np.float32).tolist()
    total, weight = kl(t, s, w)
    assert abs(float(total)) < 1e-6 and float(weight) == 5.0


def _random_lora(seed, rank, alpha, batch=None, d_in=12, d_out=10):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(lead + shape), jnp.float32)
    params = {
        "layers_0": {"q": {"a": normal(d_in, rank), "b": normal(rank, d_out)}},
        "layers_1": {"mlp": {"down": {"a": normal(d_out, rank), "b": normal(rank, d_in)}}},
    }
    return LoraWeights(params, rank, alpha)


def _dense_sq_distances(student, teacher):
    """||dW_s - dW_t||^2 per module from the materialised d x d updates (float64 numpy)."""
    dense = lambda lora: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), lora_lib.delta_w(lora))
    flat_s = dict(jax.tree_util.tree_leaves_with_path(dense(student)))
    flat_t = dict(jax.tree_util.tree_leaves_with_path(dense(teacher)))
    return {tuple(k.key for k in path): np.sum((flat_s[path] - flat_t[path]) ** 2, axis=(-2, -1))
            for path in flat_s}


@pytest.mark.parametrize("batched_teacher", [True, False])
def test_gram_distance_equals_dense(batched_teacher):
    student = _random_lora(0, rank=3, alpha=6.0, batch=4)
    teacher = _random_lora(1, rank=5, alpha=2.0, batch=4 if batched_teacher else None)
    gram = sq_distance(student, teacher)
    dense = _dense_sq_distances(student, teacher)
    assert set(gram) == set(dense) == {("layers_0", "q"), ("layers_1", "mlp", "down")}
    for path in gram:
        assert gram[path].shape == (4,)
        np.testing.assert_allclose(np.asarray(gram[path]), dense[path], rtol=1e-4)
    norms = losses.lora_sq_norm(teacher)
    zero = LoraWeights(jax.tree_util.tree_map(jnp.zeros_like, student.params), 3, 6.0)
    for path, value in sq_distance(zero, teacher).items():
        np.testing.assert_allclose(np.asarray(value), np.broadcast_to(np.asarray(norms[path]), (4,)), rtol=1e-5)


def test_alignment_loss_normalisation_and_task_mask():
    student = _random_lora(2, rank=3, alpha=6.0, batch=3)
    teacher = _random_lora(3, rank=4, alpha=8.0, batch=3)
    dense = _dense_sq_distances(student, teacher)
    teacher_norm = _dense_sq_distances(LoraWeights(jax.tree_util.tree_map(jnp.zeros_like, teacher.params), 4, 8.0),
                                       teacher)
    paths = sorted(dense)
    per_module = np.stack([dense[p] / teacher_norm[p] for p in paths])  # (M, N)
    mask = jnp.array([True, False, True])
    total, weight = alignment(student, teacher, mask, normalize="module", eps=0.0)
    assert float(weight) == 2.0
    assert float(total) == pytest.approx(float(per_module.mean(0)[[0, 2]].sum()), rel=1e-4)
    mean_norm = np.stack([teacher_norm[p] for p in paths]).mean(0)
    per_mean = np.stack([dense[p] for p in paths]) / mean_norm
    total, weight = alignment(student, teacher, None, normalize="mean", eps=0.0)
    assert float(weight) == 3.0 and float(total) == pytest.approx(float(per_mean.mean(0).sum()), rel=1e-4)
    # Student == teacher: 0; zero student under per-module normalisation: exactly 1 per task.
    same, _ = alignment(teacher, teacher)
    assert abs(float(same)) < 1e-4
    zero = LoraWeights(jax.tree_util.tree_map(jnp.zeros_like, student.params), 3, 6.0)
    total, weight = alignment(zero, teacher, eps=0.0)
    assert float(total) / float(weight) == pytest.approx(1.0, rel=1e-5)
    # Gradients reach the student only through r x r Grams and are finite.
    grads = jax.grad(lambda p: alignment(LoraWeights(p, 3, 6.0), teacher)[0])(student.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ValueError, match="modules differ"):
        sq_distance(student, LoraWeights({"layers_0": teacher.params["layers_0"]}, 4, 8.0))


def test_combine_losses():
    terms = {"ce": jnp.array(2.0), "kl": jnp.array(0.5), "ins": jnp.array(3.0)}
    total, metrics = losses.combine_losses(terms, {"ce": 1.0, "kl": 2.0, "ins": 0.0})
    assert float(total) == 3.0
    assert {k: float(v) for k, v in metrics.items()} == {"loss_ce": 2.0, "loss_kl": 0.5, "loss_ins": 3.0}
    grad = jax.grad(lambda x: losses.combine_losses({"ce": x, "kl": x * x}, {"ce": 1.0, "kl": 0.5})[0])(3.0)
    assert float(grad) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="name no loss term"):
        losses.combine_losses(terms, {"kll": 1.0})


def test_lora_task_share_matches_dense_dw_variance():
    """share = sum_g ||dW_g - mean||^2 / sum_g ||dW_g||^2 over modules, checked against dense dW."""
    rng = np.random.default_rng(0)
    params = {"q": {"a": rng.normal(size=(4, 6, 2)), "b": rng.normal(size=(4, 2, 5))},
              "v": {"a": rng.normal(size=(4, 6, 2)), "b": rng.normal(size=(4, 2, 3))}}
    lora = LoraWeights(jax.tree_util.tree_map(jnp.asarray, params), rank=2, alpha=4.0)
    dense = {k: lora.scale * np.einsum("gdr,grk->gdk", m["a"], m["b"]) for k, m in params.items()}
    between = sum(np.sum((d - d.mean(0)) ** 2) for d in dense.values())
    total = sum(np.sum(d ** 2) for d in dense.values())
    np.testing.assert_allclose(float(losses.lora_task_share(lora)), between / total, rtol=1e-5)
    same = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[:1], x.shape), lora.params)
    assert abs(float(losses.lora_task_share(lora.replace(params=same)))) < 1e-6
    zero = jax.tree_util.tree_map(jnp.zeros_like, lora.params)
    assert float(losses.lora_task_share(lora.replace(params=zero))) == 0.0
