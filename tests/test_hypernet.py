"""TAGI hypernetwork: slots, dW = 0 at init, tree layout, learning signal, fusion, logical axes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxlm.errors import ConfigError
from jaxlm.models import hypernet as H
from jaxlm.models import lora as lora_lib
from jaxlm.models.bert import Bert, BertConfig
from jaxlm.models.llama import Llama, LlamaConfig
from jaxlm.models.lora import LoraSpec
from jaxlm.models.t5 import T5, T5Config
from jaxlm.train import losses
from jaxlm.sharding import LOGICAL_RULES, logical_to_spec

N, T, B, L = 2, 6, 3, 7


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Llama(cfg)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    return model, boxed, nn.unbox(boxed)


@pytest.fixture(scope="module")
def t5():
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, num_decoder_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20)
    model = T5(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), ids, None, ids)["params"]
    return model, boxed, nn.unbox(boxed)


def _ids(key, shape, vocab):
    return jax.random.randint(jax.random.PRNGKey(key), shape, 3, vocab)


def _instruction_mask():
    return jnp.array([[True] * T, [True] * 4 + [False] * (T - 4)])  # second instruction right-padded


def _hyper(boxed, targets, width=32, depth=1, **kw):
    spec = LoraSpec(targets, rank=4, alpha=8.0)
    config = H.HypernetConfig(lora=spec, width=width, depth=depth, num_heads=4, **kw)
    return H.HyperLoRA(config, H.lora_slots(boxed, spec)), spec


def _generate(hyper, kind, encoder, encoder_params, ids, mask):
    """(instruction states, boxed hypernet variables, output with fusion if configured), in ONE jit:
    every jit here is a fresh compile, and compiles dominate these tests' time."""
    with_fusion = hyper.config.fusion

    @jax.jit
    def run(encoder_params, ids, mask):
        h = H.encode_instruction(kind, encoder, encoder_params, ids, mask)
        variables = hyper.init(jax.random.PRNGKey(1), h, mask)
        return h, variables, hyper.apply(variables, h, mask, with_fusion=with_fusion)

    return run(encoder_params, ids, mask)


@pytest.fixture(scope="module")
def llama_hyper(llama):
    model, boxed, params = llama
    hyper, spec = _hyper(boxed, ("q_proj", "v_proj", "down_proj"), depth=2)
    mask = _instruction_mask()
    h, variables, lora_N = _generate(hyper, "base", model, params, _ids(1, (N, T), 64), mask)
    return hyper, spec, h, mask, variables, lora_N


@pytest.fixture(scope="module")
def t5_hyper(t5):
    model, boxed, params = t5
    hyper, _ = _hyper(boxed, ("q", "v", "wo"), fusion=True)
    mask = _instruction_mask()
    _, _, (lora_N, fused_NxTxD) = _generate(hyper, "base", model, params, _ids(1, (N, T), 50), mask)
    return hyper, mask, lora_N, fused_NxTxD


def test_slots_canonical_order_and_types(llama, t5):
    _, boxed, _ = llama
    slots = H.lora_slots(boxed, LoraSpec(("q_proj", "down_proj")))
    assert [(s.layer, s.module) for s in slots] == [
        (0, "mlp/down_proj"), (0, "self_attn/q_proj"), (1, "mlp/down_proj"), (1, "self_attn/q_proj")]
    assert (slots[0].d_in, slots[0].d_out, slots[0].axes) == (48, 32, ("mlp", "embed"))
    # Layer numbers, not dict (string) order: layers_10 comes after layers_2.
    leaf = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    fake = {f"layers_{i}": {"attn": {"q": {"kernel": leaf}}} for i in (10, 2, 0)}
    assert [s.path[0] for s in H.lora_slots(fake, LoraSpec(("q",)))] == ["layers_0", "layers_2", "layers_10"]
    # T5: one module type per attention kind, FF shared across stacks (layer_1 vs layer_2 dropped),
    # distinct global layer indices for encoder and decoder blocks.
    t5_slots = H.lora_slots(t5[1], LoraSpec(("q", "wo")))
    assert {s.module for s in t5_slots} == {"SelfAttention/q", "EncDecAttention/q", "DenseReluDense/wo"}
    assert sorted({s.layer for s in t5_slots}) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="match no module"):
        H.lora_slots(boxed, LoraSpec(("nope",)))


def test_config_errors():
    spec = LoraSpec(("q",))
    with pytest.raises(ConfigError, match="encoder"):
        H.HypernetConfig(lora=spec, encoder="gpt")
    with pytest.raises(ConfigError, match="num_heads"):
        H.HypernetConfig(lora=spec, width=30, num_heads=4)


def test_init_gives_base_logits_and_lora_layout_llama(llama, llama_hyper):
    model, _, params = llama
    _, spec, _, _, _, lora_N = llama_hyper
    ref = lora_lib.init_lora(spec, params, batch_size=N)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
    assert shapes(lora_N.params) == shapes(ref.params)
    assert (lora_N.rank, lora_N.alpha) == (spec.rank, spec.alpha)
    for dw in jax.tree_util.tree_leaves(lora_lib.delta_w(lora_N)):
        assert float(jnp.max(jnp.abs(dw))) == 0.0
    # A has LoRA-init magnitude: std 1/sqrt(3 d_in) (PEFT's uniform bound 1/sqrt(d_in)).
    a = lora_N.params["layers_0"]["mlp"]["down_proj"]["a"]
    assert 0.5 < float(jnp.std(a)) * np.sqrt(3 * 48) < 2.0

    @jax.jit
    def both(params, ids, lora_N, task_B):
        base = model.apply({"params": params}, ids)
        return base, model.apply({"params": params}, ids, lora=lora_lib.per_example(lora_N, task_B))

    base, adapted = both(params, _ids(2, (B, L), 64), lora_N, jnp.array([1, 0, 1]))
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_one_step_gives_instruction_specific_adapters_and_finite_grads(llama, llama_hyper):
    """A jitted gradient through HyperLoRA -> base model is finite and nonzero for B's head; after
    one SGD step the loss falls and the two instructions get different (nonzero) dW."""
    model, _, params = llama
    hyper, _, h, mask, variables, _ = llama_hyper
    hp = nn.unbox(variables["params"])
    ids, targets = _ids(5, (B, L), 64), _ids(6, (B, L), 64)
    task_B = jnp.array([0, 1, 0])

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss_and_grad(hp):
        lora_N = hyper.apply({"params": hp}, h, mask)
        logits = model.apply({"params": params}, ids, lora=lora_lib.per_example(lora_N, task_B))
        return losses.safe_mean(*losses.weighted_cross_entropy(logits, targets, jnp.ones((B, L)))), lora_N

    (loss0, _), grads = loss_and_grad(hp)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["self_attn_v_proj_b_kernel"]).max()) > 0
    new = jax.tree_util.tree_map(lambda p, g: p - 1.0 * g, hp, grads)
    (loss1, lora_N), _ = loss_and_grad(new)
    assert float(loss1) < float(loss0)
    dw = lora_lib.delta_w(lora_N)["layers_1"]["self_attn"]["v_proj"]
    assert float(jnp.abs(dw).max()) > 0
    assert float(jnp.abs(dw[0] - dw[1]).max()) > 1e-4 * float(jnp.abs(dw).max())


def test_init_gives_base_logits_t5(t5, t5_hyper):
    model, _, params = t5
    lora_N = t5_hyper[2]

    @jax.jit
    def both(params, enc, dec, lora_N, task_B):
        base = model.apply({"params": params}, enc, None, dec)
        return base, model.apply({"params": params}, enc, None, dec, lora=lora_lib.per_example(lora_N, task_B))

    base, adapted = both(params, _ids(3, (B, L), 50), _ids(4, (B, 4), 50), lora_N, jnp.array([0, 1, 1]))
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_fusion_changes_logits_and_masked_instruction_is_plain_decode(t5, t5_hyper):
    model, _, params = t5
    _, mask, lora_N, fused_NxTxD = t5_hyper
    assert fused_NxTxD.shape == (N, T, 16)
    task_B = jnp.array([0, 1, 0])
    enc, dec = _ids(3, (B, L), 50), _ids(4, (B, 4), 50)
    enc_mask = jnp.ones((B, L), bool).at[2, 5:].set(False)

    @jax.jit
    def three(params, lora_N, fused_NxTxD, mask):
        lora_B = lora_lib.per_example(lora_N, task_B)
        instr_B, instr_mask_B = jnp.take(fused_NxTxD, task_B, axis=0), jnp.take(mask, task_B, axis=0)
        plain = model.apply({"params": params}, enc, enc_mask, dec, lora=lora_B)
        fused = H.fused_logits(model, params, enc, enc_mask, dec, instr_B, instr_mask_B, lora=lora_B)
        off = H.fused_logits(model, params, enc, enc_mask, dec, instr_B, jnp.zeros_like(instr_mask_B), lora=lora_B)
        return plain, fused, off

    plain, fused, off = three(params, lora_N, fused_NxTxD, mask)
    np.testing.assert_allclose(np.asarray(off), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fused - plain).max()) > 1e-3


def test_logical_axes_cover_every_param(llama):
    _, boxed, _ = llama
    hyper, _ = _hyper(boxed, ("q_proj", "v_proj"), fusion=True, fusion_dim=16)
    h, mask = jnp.zeros((N, T, 32)), jnp.ones((N, T), bool)
    abstract = jax.eval_shape(lambda: hyper.init(jax.random.PRNGKey(0), h, mask)["params"])
    specs = nn.get_partition_spec(abstract)
    rules = dict(LOGICAL_RULES)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves) and "fusion_proj" in nn.unbox(abstract)
    for (path, leaf), spec in zip(leaves, spec_leaves):
        assert len(spec) == leaf.ndim, path
        assert all(name in rules for name in spec), (path, spec)
        logical_to_spec(spec)  # maps onto the mesh
    assert H.num_params(abstract) == sum(int(np.prod(x.shape)) for _, x in leaves)


def test_minilm_encoder_and_fusion_projection(t5):
    bert = Bert(BertConfig(vocab_size=40, hidden_size=24, num_layers=1, num_heads=2, intermediate_size=32,
                           max_position_embeddings=16))
    ids = _ids(1, (N, T), 40)
    mask = _instruction_mask()
    bert_params = nn.unbox(jax.jit(bert.init)(jax.random.PRNGKey(0), ids, mask)["params"])
    _, boxed, _ = t5
    hyper, _ = _hyper(boxed, ("q",), encoder="minilm", fusion=True, fusion_dim=16)
    h, _, (lora_N, fused) = _generate(hyper, "minilm", bert, bert_params, ids, mask)
    assert h.shape == (N, T, 24) and fused.shape == (N, T, 16)
    assert lora_N.params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["a"].shape == (N, 16, 4)
    with pytest.raises(ConfigError, match="BERT"):
        H.encode_instruction("minilm", t5[0], t5[2], ids, mask)


def test_encoder_layer_reads_an_intermediate_residual_stream(llama):
    """HypernetConfig.encoder_layer = k: the residual stream after k blocks. k = num_layers, normed by the
    model's final RMSNorm, is the usual final hidden state; k = 1 differs; out of range is refused by name."""
    model, _, params = llama
    ids, mask = _ids(2, (N, T), model.config.vocab_size), _instruction_mask()
    final = H.encode_instruction("base", model, params, ids, mask)
    last = H.encode_instruction("base", model, params, ids, mask, layer=model.config.num_layers)
    scale = params["norm"]["weight"]
    normed = last * jax.lax.rsqrt(jnp.mean(last**2, -1, keepdims=True) + model.config.rms_norm_eps) * scale
    np.testing.assert_allclose(np.asarray(normed), np.asarray(final), atol=1e-4, rtol=1e-4)
    first = H.encode_instruction("base", model, params, ids, mask, layer=1)
    assert first.shape == final.shape and float(jnp.abs(first - last).max()) > 1e-2
    with pytest.raises(ConfigError, match="HypernetConfig.encoder_layer=9"):
        H.encode_instruction("base", model, params, ids, mask, layer=9)


def _adapter_step(boxed, width, head_scaling, lr=1e-3):
    """RMS per-entry change of the emitted A and of the emitted B after ONE Adam step on a fixed linear
    loss sum(A * R_A) + sum(B * R_B), plus the initial std of A; the same instruction states at any width."""
    import optax

    hyper, _ = _hyper(boxed, ("q_proj", "down_proj"), width=width, depth=1, head_scaling=head_scaling)
    h = jax.random.normal(jax.random.PRNGKey(3), (N, T, 32))
    mask = _instruction_mask()
    params = nn.unbox(hyper.init(jax.random.PRNGKey(1), h, mask)["params"])
    emit = lambda p: hyper.apply({"params": p}, h, mask).params
    targets = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(7), x.shape), emit(params))
    loss = lambda p: sum(jnp.sum(x * r) for x, r in zip(jax.tree_util.tree_leaves(emit(p)),
                                                         jax.tree_util.tree_leaves(targets)))
    opt = optax.adam(lr)
    updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
    before, after = emit(params), emit(optax.apply_updates(params, updates))
    rms = lambda leaf: float(np.sqrt(np.mean(np.concatenate([
        np.ravel(np.asarray(a[leaf]) - np.asarray(b[leaf])) for a, b in zip(
            jax.tree_util.tree_leaves(after, is_leaf=lambda x: isinstance(x, dict) and "a" in x),
            jax.tree_util.tree_leaves(before, is_leaf=lambda x: isinstance(x, dict) and "a" in x))]) ** 2)))
    a0 = before["layers_0"]["mlp"]["down_proj"]["a"]
    return rms("a"), rms("b"), float(jnp.std(a0))


def test_emitted_adapter_step_does_not_grow_with_width(llama):
    """One Adam step moves a plain LoRA's A/B entries by lr; under head_scaling='width' the emitted A/B
    move by about that at width 32 and at width 256 alike, and A starts at LoRA-init magnitude. The
    version-one heads ('none') move them about width times faster: the runaway this parametrisation fixes."""
    _, boxed, _ = llama
    lr = 1e-3
    small, large = _adapter_step(boxed, 32, "width", lr), _adapter_step(boxed, 256, "width", lr)
    for da, db, std_a in (small, large):
        assert 0.3 * lr < da < 4 * lr and 0.3 * lr < db < 4 * lr, (da, db)
        assert 0.5 < std_a * np.sqrt(3 * 48) < 2.0  # down_proj d_in = 48
    assert large[0] / small[0] < 1.5 and large[1] / small[1] < 1.5
    old_small, old_large = _adapter_step(boxed, 32, "none", lr), _adapter_step(boxed, 256, "none", lr)
    assert old_large[1] / old_small[1] > 4  # B: W x lr per step under the old heads
    assert old_large[1] > 20 * large[1]
