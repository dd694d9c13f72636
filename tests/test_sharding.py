"""Sharded forward on 8 fake CPU devices (data=2, fsdp=2, tensor=2) equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.checkpoints.pretrained import abstract_params, init_params
from jaxlm.models import lora as lora_lib
from jaxlm.models.bert import BertConfig
from jaxlm.models.llama import LlamaConfig
from jaxlm.models.t5 import T5Config
from jaxlm import sharding

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def test_rules_table_and_mesh_parsing():
    assert sharding.parse_mesh_shape("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    assert sharding.logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed")) == PartitionSpec(("data", "fsdp"), None, None)
    mesh = sharding.make_mesh("data=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="pipeline"):
        sharding.parse_mesh_shape("pipeline=2")
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh("data=4,fsdp=4")


TINY = {
    "llama": CONFIG,
    "t5": T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "bert": BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_param_has_logical_axes_known_to_the_rules(family):
    abstract = abstract_params(family, TINY[family])
    specs = jax.tree_util.tree_leaves(sharding.param_logical_specs(abstract), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree_util.tree_leaves(nn.unbox(abstract))
    assert len(specs) == len(shapes) > 0
    for spec, leaf in zip(specs, shapes):
        assert len(spec) == leaf.ndim and all(a is not None for a in spec)
        sharding.logical_to_spec(spec)  # raises on a logical name missing from LOGICAL_RULES


def test_sharded_init_builds_params_in_place():
    from jaxlm.models.llama import Llama

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    init = lambda: Llama(CONFIG).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = sharding.sharded_init(init, mesh)
    kernel = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("tensor", "fsdp")
    reference = init_params("llama", CONFIG, seed=0)
    # Same random draws; jit vs eager may round the normal transform differently in the last ulp.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8),
                           params, reference)


def test_sharded_forward_equals_unsharded():
    assert jax.device_count() == 8
    params = init_params("llama", CONFIG, seed=0)
    model_specs = sharding.param_logical_specs(abstract_params("llama", CONFIG))
    from jaxlm.models.llama import Llama

    model = Llama(CONFIG)
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, 128)
    mask = jnp.ones((8, 16), bool).at[:, 12:].set(False)
    spec = lora_lib.LoraSpec(("q_proj", "v_proj"), rank=4)
    lora = lora_lib.init_lora(spec, params, jax.random.PRNGKey(2), batch_size=8)
    lora = lora.replace(params=jax.tree_util.tree_map(lambda x: x + 0.05, lora.params))
    expected = np.asarray(model.apply({"params": params}, ids, mask, lora=lora))

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    param_shardings = sharding.logical_sharding(model_specs, params, mesh)
    lora_specs = lora_lib.lora_logical_axes(lora, model_specs)
    lora_shardings = lora.replace(params=sharding.logical_sharding(lora_specs, lora.params, mesh))
    data_sharding = sharding.batch_sharding(mesh, 2)
    # Weights really are split: the MLP kernel is sharded over fsdp x tensor.
    up = param_shardings["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert up.spec == PartitionSpec("fsdp", "tensor")

    with jax.set_mesh(mesh):
        fwd = jax.jit(
            lambda p, i, m, l: model.apply({"params": p}, i, m, lora=l),
            in_shardings=(param_shardings, data_sharding, data_sharding, lora_shardings),
            out_shardings=NamedSharding(mesh, sharding.logical_to_spec(("batch", "length", "vocab"))),
        )
        sharded_params = jax.device_put(params, param_shardings)
        out = fwd(sharded_params, jax.device_put(ids, data_sharding), jax.device_put(mask, data_sharding),
                  jax.device_put(lora, lora_shardings))
    assert len(sharded_params["layers_0"]["mlp"]["up_proj"]["kernel"].addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
