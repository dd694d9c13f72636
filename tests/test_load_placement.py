"""Loading onto a mesh: `load_pretrained(mesh=...)` places each tensor on its shards as it is read
(the whole param tree never exists on one host), with the plain load's values, and a TrainStep over
a mesh trains a pretrained base loaded that way to the same losses as on one device."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.checkpoints import hf
from jaxlm.checkpoints.pretrained import load_pretrained
from jaxlm.errors import ConfigError
from jaxlm.models.lora import LoraSpec
from jaxlm.sharding import make_mesh
from jaxlm.train import objectives
from jaxlm.train.objectives import CausalLM
from jaxlm.train.optim import make_optimizer
from jaxlm.train.steps import TrainStep
from jaxlm.train.synthetic import SyntheticBatches
from tests.gguf_tiny import write_llama_gguf
from tests.hf_tiny import tiny_llama_dir

MESH = "data=2,fsdp=2,tensor=2"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("placement") / "llama")


def _paths(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_mesh_load_puts_each_param_on_its_named_sharding_with_the_plain_values(llama_dir, param_dtype):
    mesh = make_mesh(MESH)
    plain = load_pretrained(llama_dir, param_dtype=param_dtype)
    placed = load_pretrained(llama_dir, param_dtype=param_dtype, mesh=mesh)
    got, want = _paths(placed.params), _paths(plain.params)
    assert got.keys() == want.keys() and len(got) == 21
    # The specs TrainStep gives these params: (in, out) kernels split fsdp x tensor, the
    # (vocab, embed) table tensor x fsdp, norms over fsdp.
    specs = {"['layers_0']['self_attn']['q_proj']['kernel']": P("fsdp", "tensor"),
             "['layers_1']['mlp']['down_proj']['kernel']": P("tensor", "fsdp"),
             "['embed_tokens']['embedding']": P("tensor", "fsdp"),
             "['lm_head']['kernel']": P("fsdp", "tensor"),
             "['norm']['weight']": P("fsdp")}
    for key, spec in specs.items():
        assert got[key].sharding == NamedSharding(mesh, spec), key
    q = got["['layers_0']['self_attn']['q_proj']['kernel']"]
    assert {s.data.shape for s in q.addressable_shards} == {(32, 32)}  # each device holds a quarter of (64, 64)
    for key, value in got.items():
        assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh, key
        assert value.dtype == jnp.dtype(param_dtype) == want[key].dtype, key
        np.testing.assert_array_equal(np.asarray(value.astype(jnp.float32)), np.asarray(want[key].astype(jnp.float32)))
    logits = lambda pre: np.asarray(pre.model.apply({"params": pre.params}, jnp.asarray([[5, 17, 99, 3]])))
    np.testing.assert_allclose(logits(placed), logits(plain), rtol=0, atol=1e-5)


def test_tensors_are_read_and_placed_one_at_a_time(llama_dir, monkeypatch):
    """Each tensor is read, placed on the mesh, and its host copy released before the next is read."""
    events, alive = [], []
    read, place = hf.SafetensorsTensors.__getitem__, hf.place_tensor

    def reading(self, name):
        value = read(self, name)
        # every tensor read before this one is gone from host memory (no reference kept by the loader)
        alive.append(sum(ref() is not None for ref in refs))
        refs.append(weakref.ref(value))
        events.append(("read", name))
        return value

    def placing(value, sharding, dtype):
        events.append(("place", value.shape))
        return place(value, sharding, dtype)

    refs: list = []
    monkeypatch.setattr(hf.SafetensorsTensors, "__getitem__", reading)
    monkeypatch.setattr(hf, "place_tensor", placing)
    mesh = make_mesh(MESH)
    pre = load_pretrained(llama_dir, param_dtype="bfloat16", mesh=mesh)
    kinds = [kind for kind, _ in events]
    assert kinds == ["read", "place"] * 21  # strictly alternating: one tensor in flight
    assert alive == [0] * 21
    assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree_util.tree_leaves(pre.params))


def test_gguf_loads_onto_a_mesh_like_the_plain_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    path = write_llama_gguf(tmp_path / "m.gguf", model, {})
    mesh = make_mesh(MESH)
    plain, placed = load_pretrained(path), load_pretrained(path, mesh=mesh)
    want = _paths(plain.params)
    for key, value in _paths(placed.params).items():
        assert value.sharding.mesh == mesh, key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[key]))
    assert placed.params["layers_0"]["self_attn"]["k_proj"]["kernel"].sharding == NamedSharding(mesh, P("fsdp", "tensor"))


def _train(objective, mesh, steps=3):
    step = TrainStep(objective, make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10), mesh)
    state, frozen = step.init_state(jax.random.PRNGKey(0))
    data = SyntheticBatches(batch_size=8, seq_len=16, vocab_size=128)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, next(data))
        losses.append(float(metrics["loss"]))
    return step, state, frozen, losses


@pytest.mark.parametrize("lora", [None, LoraSpec(("q_proj", "v_proj"), rank=4, alpha=8.0)], ids=["full", "lora"])
def test_train_step_over_a_mesh_reads_the_base_placed_and_matches_one_device(llama_dir, monkeypatch, lora):
    calls, placed = [], []
    load, read = objectives.load_pretrained, objectives.read_pretrained_params

    def recording(name, **kwargs):
        calls.append((kwargs.get("weights", True), kwargs.get("mesh")))
        return load(name, **kwargs)

    def reading(*args):
        placed.append(read(*args))
        return placed[-1]

    monkeypatch.setattr(objectives, "load_pretrained", recording)
    monkeypatch.setattr(objectives, "read_pretrained_params", reading)
    objectives.describe_pretrained.cache_clear()
    mesh = make_mesh(MESH)
    step, state, frozen, sharded = _train(CausalLM(pretrained=str(llama_dir), lora=lora), mesh)
    # weights were read once, each tensor onto the mesh; every other read was config/shapes only
    assert [c for c in calls if c[0]] == [(True, mesh)]
    # the init consumed the placed base (donated): the trained/frozen base reuses its buffers, no second copy
    placed_leaves = [x for x in jax.tree_util.tree_leaves(placed[-1]) if isinstance(x, jax.Array)]
    assert len(placed_leaves) == 21 and all(x.is_deleted() for x in placed_leaves)
    base = state.params if lora is None else frozen
    kernel = base["layers_0"]["mlp"]["up_proj"]["kernel"]
    where = step.trainable_shardings if lora is None else step.frozen_shardings
    assert kernel.sharding == where["layers_0"]["mlp"]["up_proj"]["kernel"] == NamedSharding(mesh, P("fsdp", "tensor"))
    _, _, _, single = _train(CausalLM(pretrained=str(llama_dir), lora=lora), make_mesh("data=1", jax.devices()[:1]))
    assert sharded[0] > 4.0  # ~ log(128) at the random tiny model
    np.testing.assert_allclose(sharded, single, rtol=0, atol=2e-5)


def test_param_dtype_field_reads_the_base_in_that_dtype_and_refuses_others(llama_dir):
    objective = CausalLM(pretrained=str(llama_dir), lora=LoraSpec(("q_proj",), rank=2, alpha=4.0), param_dtype="bfloat16")
    assert objective.config.param_dtype == "bfloat16"
    _, _, frozen, losses = _train(objective, make_mesh(MESH), steps=1)
    assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype("bfloat16")}
    want = load_pretrained(llama_dir)
    np.testing.assert_array_equal(np.asarray(frozen["norm"]["weight"]),
                                  np.asarray(want.params["norm"]["weight"].astype(jnp.bfloat16)))
    assert np.isfinite(losses[0])
    with pytest.raises(ConfigError, match=r"CausalLM.param_dtype = 'int8': expected one of"):
        CausalLM(pretrained=str(llama_dir), param_dtype="int8")
    with pytest.raises(ValueError, match=r"param_dtype 'int8': expected float32, bfloat16 or float16"):
        load_pretrained(llama_dir, param_dtype="int8")


def test_an_eval_model_loads_onto_the_engine_mesh_once(llama_dir):
    """`jaxlm eval --mesh`: the sweep's model is read onto the mesh, and the engine keeps those arrays."""
    from jaxlm.eval.engine import Engine
    from jaxlm.eval.sweep import EvalModel

    mesh = make_mesh(MESH)
    pre = EvalModel("m", pretrained=str(llama_dir)).load(mesh)
    q = pre.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    engine = Engine(pre, batch_size=4, mesh=mesh)
    assert engine.params["layers_0"]["self_attn"]["q_proj"]["kernel"] is q  # placed once, not copied again
    plain = load_pretrained(llama_dir)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.params["layers_0"]["self_attn"]["q_proj"]["kernel"]))


def test_train_step_shapes_and_lowering_read_no_weights(llama_dir, monkeypatch):
    """TrainStep's abstract state/frozen (what `jaxlm plan` compiles) come from the checkpoint's
    header alone: no tensor is read."""
    monkeypatch.setattr(hf.SafetensorsTensors, "__getitem__", lambda self, name: pytest.fail(f"tensor {name} read"))
    objectives.describe_pretrained.cache_clear()
    mesh = make_mesh(MESH)
    step = TrainStep(CausalLM(pretrained=str(llama_dir), lora=LoraSpec(("q_proj",), rank=2)),
                     make_optimizer(learning_rate=1e-2, total_steps=10), mesh)
    frozen = step.abstract_frozen()
    q = frozen["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (64, 64) and q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    batch = next(SyntheticBatches(batch_size=8, seq_len=16, vocab_size=128))
    shardings = step.batch_sharding(batch)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
    assert step.lower(step.abstract_state(), frozen, abstract_batch).compile() is not None


def test_place_tensor_converts_each_distinct_slice_once():
    """Devices that hold the same slice (replicated axes) share one host conversion; values exact."""

    class Counting(np.ndarray):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return np.asarray(self)[index]

    mesh = make_mesh(MESH)
    x = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    for spec, distinct in ((P(), 1), (P("fsdp", "tensor"), 4), (P(None, ("data", "fsdp", "tensor")), 8)):
        Counting.reads = 0
        placed = hf.place_tensor(x.view(Counting), NamedSharding(mesh, spec), jnp.bfloat16)
        assert Counting.reads == distinct == len({str(s.index) for s in placed.addressable_shards}), spec
        assert placed.dtype == jnp.bfloat16 and placed.sharding == NamedSharding(mesh, spec)
        np.testing.assert_array_equal(np.asarray(placed, np.float32), x)


def test_export_gathers_and_writes_one_tensor_at_a_time(llama_dir, tmp_path, monkeypatch):
    """export_hf of params on a mesh: each tensor is gathered to host, converted and written before
    the next one is gathered; the files hold the params' values (here rounded to bf16)."""
    from jaxlm.checkpoints.hf import ParamTensors, read_safetensors
    from jaxlm.checkpoints.pretrained import export_hf

    pre = load_pretrained(llama_dir, mesh=make_mesh(MESH))
    refs, alive = [], []
    convert = ParamTensors.__getitem__

    def converting(self, name):
        value = convert(self, name)
        alive.append(sum(ref() is not None for ref in refs))
        refs.append(weakref.ref(value))
        return value

    monkeypatch.setattr(ParamTensors, "__getitem__", converting)
    out = export_hf(pre, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=20_000)
    assert alive == [0] * 21  # every earlier host tensor was dropped when the next was gathered
    tensors = read_safetensors(out)
    assert len({f for f, *_ in tensors.entries.values()}) > 1  # sharded files, streamed the same way
    q = np.asarray(tensors["model.layers.0.self_attn.q_proj.weight"], np.float32)
    want = pre.params["layers_0"]["self_attn"]["q_proj"]["kernel"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(q, np.asarray(want, np.float32).T)
