"""The jitted train step: losses, learning, sharding invariance, accumulation, LoRA freezing, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models.llama import Llama, LlamaConfig
from jaxlm.models.lora import LoraSpec
from jaxlm.models.t5 import T5, T5Config
from jaxlm.train import losses
from jaxlm.train.objectives import CausalLM, Seq2SeqLM
from jaxlm.train.optim import make_optimizer, make_schedule
from jaxlm.sharding import make_mesh
from jaxlm.train.steps import TrainStep
from jaxlm.train.synthetic import SyntheticBatches

# One layer keeps compile time (most of these tests' cost) low; two-layer runs live in the loop tests.
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
ONE_DEVICE = make_mesh("data=1", jax.devices()[:1])


def run(objective, mesh, steps, microbatches=1, lr=1e-2, name="adamw", data=None, dtype=None):
    step = TrainStep(objective, make_optimizer(name, learning_rate=lr, warmup_steps=2, total_steps=50), mesh,
                     microbatches, dtype)
    state, frozen = step.init_state(jax.random.PRNGKey(0))
    data = data or SyntheticBatches(batch_size=8, seq_len=16, vocab_size=64)
    out = []
    for _ in range(steps):
        state, metrics = step(state, frozen, next(data))
        out.append(jax.device_get(metrics))
    return step, state, frozen, out


def test_weighted_cross_entropy_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    logits[1, 2] = np.nan  # a padding position's garbage must not leak into the loss
    targets = np.array([[1, 2, 3], [4, 0, 0]])
    weights = np.array([[1.0, 1.0, 0.5], [1.0, 0.0, 0.0]], np.float32)
    total, weight = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = logits[:, :2] - np.log(np.exp(logits[:, :2]).sum(-1, keepdims=True))
    expected = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 4])
    logp02 = logits[0, 2] - np.log(np.exp(logits[0, 2]).sum())
    expected += -0.5 * logp02[3]
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(weight) == 3.5
    assert float(losses.safe_mean(jnp.float32(0), jnp.float32(0))) == 0.0


def test_schedule_warmup_then_cosine_to_final_fraction():
    lr = make_schedule(1.0, "cosine", warmup_steps=10, total_steps=110, final_fraction=0.1)
    assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6 and abs(float(lr(10)) - 1.0) < 1e-6
    assert abs(float(lr(110)) - 0.1) < 1e-6
    lin = make_schedule(1.0, "linear", warmup_steps=0, total_steps=100, final_fraction=0.0)
    assert abs(float(lin(50)) - 0.5) < 1e-6
    assert float(make_schedule(2.0, "constant", 0, 10)(7)) == 2.0


@pytest.fixture(scope="module")
def unsharded_run():
    """40 AdamW steps on one device: the learning check and the reference for sharding/accumulation."""
    _, state, _, metrics = run(CausalLM(TINY), ONE_DEVICE, 40)
    return state, metrics


def test_loss_goes_down_on_a_tiny_llama(unsharded_run):
    state, metrics = unsharded_run
    first, last = np.mean([m["loss"] for m in metrics[:3]]), np.mean([m["loss"] for m in metrics[-3:]])
    assert first > 4.0  # ~ log(64) at init
    assert last < first - 1.0, (first, last)
    assert int(state.step) == 40
    lrs = [float(m["learning_rate"]) for m in metrics]
    assert lrs[0] == 0.0 and 0 < lrs[1] < lrs[2] and lrs[2] == max(lrs)  # linear warmup from 0 over 2 steps
    assert lrs[-1] < lrs[10] < lrs[2]  # then cosine decay
    assert all(m["finite"] for m in metrics)


def test_adafactor_with_bfloat16_compute_learns_and_keeps_float32_params():
    """t5x's usual setting: Adafactor, bf16 activations, float32 params."""
    _, state, _, metrics = run(CausalLM(TINY), ONE_DEVICE, 25, lr=3e-2, name="adafactor", dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert np.mean([m["loss"] for m in metrics[-3:]]) < metrics[0]["loss"] - 0.5


@pytest.mark.parametrize("mesh_shape", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_losses_equal_unsharded(mesh_shape, unsharded_run):
    expected = unsharded_run[1][:3]
    step, state, _, got = run(CausalLM(TINY), make_mesh(mesh_shape), 3)
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in got], [m["grad_norm"] for m in expected], rtol=1e-5)
    kernel = state.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding == step.state_shardings.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    if mesh_shape != "data=8":  # weights really are split, and Adam's moments follow them
        assert len({str(s.index) for s in kernel.addressable_shards}) > 1
        moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.shape == kernel.shape]
        assert len(moments) >= 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)


def test_gradient_accumulation_equals_one_big_batch(unsharded_run):
    """Losses of steps 2 and 3 depend on the earlier updates, so equal losses mean equal updates."""
    expected = unsharded_run[1][:3]
    _, _, _, accum = run(CausalLM(TINY), ONE_DEVICE, 3, microbatches=4)
    np.testing.assert_allclose([m["loss"] for m in accum], [m["loss"] for m in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in accum], [m["grad_norm"] for m in expected], rtol=1e-5)


def test_lora_training_leaves_base_bit_identical_and_has_no_frozen_optimizer_state():
    spec = LoraSpec(("q_proj", "v_proj"), rank=4)
    objective = CausalLM(TINY, lora=spec)
    step = TrainStep(objective, make_optimizer(learning_rate=3e-2, total_steps=20), make_mesh("fsdp=2,tensor=4"))
    state, frozen = step.init_state(jax.random.PRNGKey(0))
    base_before = jax.tree_util.tree_map(np.array, frozen)
    lora_before = jax.tree_util.tree_map(np.array, state.params)
    data = SyntheticBatches(batch_size=8, seq_len=16, vocab_size=64)
    for _ in range(5):
        state, _ = step(state, frozen, next(data))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, base_before)
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params, lora_before)
    assert all(jax.tree_util.tree_leaves(changed))  # A and B of every adapted module moved
    lora_shapes = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(state.params))
    opt_arrays = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    # Adam keeps mu and nu for each LoRA leaf and nothing else (no base-sized leaf).
    assert sorted(tuple(x.shape) for x in opt_arrays) == sorted(lora_shapes * 2)
    base_size = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
    assert sum(x.size for x in opt_arrays) == 2 * sum(x.size for x in jax.tree_util.tree_leaves(state.params)) < base_size


def test_packed_segments_attend_only_within_themselves():
    model = Llama(TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    a, b = np.arange(1, 6), np.arange(20, 29)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 9 + [0, 0]])
    positions = np.array([list(range(5)) + list(range(9)) + [0, 0]])
    apply = jax.jit(lambda ids, pos, seg: model.apply({"params": params}, ids, None, pos, segment_ids=seg))
    out = apply(packed, positions, segments)
    # The same two sequences as two right-padded rows (segment 1 on real tokens) give the same logits.
    rows = np.zeros((2, 16), np.int32)
    rows[0, :5], rows[1, :9] = a, b
    row_segments = (rows > 0).astype(np.int32)
    alone = apply(rows, np.tile(np.arange(16), (2, 1)) * row_segments, row_segments)
    np.testing.assert_allclose(out[0, :5], alone[0, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:14], alone[1, :9], atol=1e-5)
    plain = jax.jit(lambda ids: model.apply({"params": params}, ids))(b[None])  # no segment ids at all
    np.testing.assert_allclose(alone[1, :9], plain[0], atol=1e-5)

    t5 = T5(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    tp = t5.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32),
                 jnp.zeros((1, 1), jnp.int32))["params"]
    enc = np.array([[3, 4, 5, 9, 8, 0]]); enc_seg = np.array([[1, 1, 1, 2, 2, 0]])
    dec = np.array([[0, 7, 0, 6, 5]]); dec_seg = np.array([[1, 1, 2, 2, 2]])
    packed_logits = jax.jit(lambda *a: t5.apply({"params": tp}, a[0], None, a[1], None, encoder_segment_ids=a[2],
                                                decoder_segment_ids=a[3]))(enc, dec, enc_seg, dec_seg)
    first = jax.jit(lambda e, d: t5.apply({"params": tp}, e, None, d))(enc[:, :3], dec[:, :2])
    np.testing.assert_allclose(packed_logits[0, :2], first[0], atol=1e-4)


def test_seq2seq_objective_learns_on_t5():
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    data = SyntheticBatches(batch_size=8, seq_len=12, vocab_size=64, layout="encoder_decoder")
    _, _, _, metrics = run(Seq2SeqLM(config), ONE_DEVICE, 30, lr=2e-2, data=data)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0


def test_lr_multipliers_scale_one_group_and_refuse_a_pattern_that_matches_nothing():
    from jaxlm.errors import ConfigError
    from jaxlm.train.optim import make_optimizer

    params = {"hypernet": {"q_proj_a_kernel": jnp.ones((2, 3)), "block_0": {"kernel": jnp.ones((3, 3))}}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    plain = make_optimizer(learning_rate=1e-2, schedule="constant", clip_norm=None)
    scaled = make_optimizer(learning_rate=1e-2, schedule="constant", clip_norm=None,
                            lr_multipliers={r"hypernet/.*_a_kernel$": 10.0})
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u_scaled["hypernet"]["q_proj_a_kernel"], 10 * u_plain["hypernet"]["q_proj_a_kernel"],
                               rtol=1e-6)
    np.testing.assert_array_equal(u_scaled["hypernet"]["block_0"]["kernel"], u_plain["hypernet"]["block_0"]["kernel"])
    with pytest.raises(ConfigError, match="'decoder/.*' matches no trainable parameter"):
        make_optimizer(lr_multipliers={"decoder/.*": 2.0}).init(params)
    with pytest.raises(ConfigError, match="must be > 0"):
        make_optimizer(lr_multipliers={"hypernet": 0.0})
