"""TrainCheckpointer: bitwise round trip, retention, resharding restore, damaged/unfinished saves."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.train_state import CorruptCheckpointWarning, TrainCheckpointer
from jaxlm.models.llama import LlamaConfig
from jaxlm.train.objectives import CausalLM
from jaxlm.train.optim import make_optimizer
from jaxlm.sharding import make_mesh
from jaxlm.train.steps import TrainStep
from jaxlm.train.synthetic import SyntheticBatches

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
REPO = Path(__file__).resolve().parents[1]


def make_step(mesh_shape: str) -> TrainStep:
    return TrainStep(CausalLM(TINY), make_optimizer("adamw", learning_rate=1e-2, warmup_steps=1, total_steps=20),
                     make_mesh(mesh_shape))


@pytest.fixture(scope="module")
def trained():
    """A TrainState on mesh data=8 whose every leaf (params, Adam moments, counts, step, rng) holds
    distinct random bits, so a round trip that drops or mixes up any leaf is caught."""
    step = make_step("data=8")
    state, _ = step.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def scramble(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            host = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        else:
            host = rng.integers(1, 1000, leaf.shape).astype(leaf.dtype)
        return jax.device_put(host, leaf.sharding)

    data = SyntheticBatches(batch_size=8, seq_len=16, vocab_size=64)
    next(data), next(data)
    return step, jax.tree_util.tree_map(scramble, state), data.state()


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def test_round_trip_is_bitwise_with_data_state(tmp_path, trained):
    step, state, data_state = trained
    ckpt = TrainCheckpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() is None and ckpt.restore(step.abstract_state()) is None
    ckpt.save(2, state, data_state)
    ckpt.wait()
    assert ckpt.latest_step() == 2
    restored, got_data_state, at = ckpt.restore(step.abstract_state())
    ckpt.close()
    assert at == 2 and got_data_state == data_state == {"index": 2, "seed": 0}
    assert int(restored.step) == int(state.step) != 0
    assert leaves_equal(restored, state)  # params, both Adam moments, counts, rng: bit for bit
    assert jax.tree_util.tree_leaves(restored.opt_state)  # the optimizer state really went through
    for leaf, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(step.state_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_a_checkpoint_of_another_layout_is_refused_and_left_in_place(tmp_path, trained):
    """A changed config (wider model) is not damage: restore fails loudly naming the step, nothing moves."""
    import dataclasses as dc

    step, state, data_state = trained
    ckpt = TrainCheckpointer(tmp_path / "ckpt")
    ckpt.save(2, state, data_state)
    ckpt.wait()
    wider = TrainStep(CausalLM(dc.replace(TINY, hidden_size=48)),
                      make_optimizer("adamw", learning_rate=1e-2, warmup_steps=1, total_steps=20), make_mesh("data=8"))
    with pytest.raises(CheckpointError, match="step 2|/2:") as err:
        ckpt.restore(wider.abstract_state())
    assert "new --workdir" in str(err.value)
    ckpt.close()
    assert (tmp_path / "ckpt" / "2").is_dir() and not (tmp_path / "ckpt.corrupt").exists()


def test_keep_last_and_keep_every(tmp_path):
    small = {"w": jax.numpy.arange(12.0).reshape(3, 4)}
    ckpt = TrainCheckpointer(tmp_path / "ckpt", keep_last=2, keep_every=4, async_save=True)
    for s in range(1, 11):
        ckpt.save(s, small, {"index": s})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    ckpt.close()
    plain = TrainCheckpointer(tmp_path / "plain", keep_last=3)
    for s in range(1, 6):
        plain.save(s, small, {"index": s})
    plain.wait()
    assert plain.all_steps() == [3, 4, 5]
    plain.close()


def test_restore_onto_a_different_mesh_reshards(tmp_path, trained):
    step, state, data_state = trained
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state, data_state)
        ckpt.wait()
    target = make_step("fsdp=4,tensor=2")
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        restored, _, at = ckpt.restore(target.abstract_state())
    assert at == 2 and leaves_equal(restored, state)
    specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(restored.params)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)  # really resharded
    for leaf, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target.state_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def _three_steps(directory: Path, trained) -> None:
    step, state, data_state = trained
    with TrainCheckpointer(directory, keep_last=5) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, state, {**data_state, "index": s})
        ckpt.wait()


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore teardown after a failed read
@pytest.mark.parametrize("damage", ["truncate", "delete", "empty"])
def test_corrupt_latest_step_falls_back_with_a_warning(tmp_path, trained, damage):
    step, state, _ = trained
    _three_steps(tmp_path / "ckpt", trained)
    victim = _largest_array_file(tmp_path / "ckpt" / "3")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"")
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored, data_state, at = ckpt.restore(step.abstract_state())
        if damage == "empty":  # visible without reading: latest_step already skips it
            assert ckpt.latest_step() == 2
        with pytest.raises(CheckpointError, match="step 3"):
            ckpt.restore(step.abstract_state(), step=3)
    assert at == 2 and data_state["index"] == 2 and leaves_equal(restored, state)
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptCheckpointWarning)]
    assert len(messages) == 1 and "step 3" in messages[0], messages


def test_missing_metadata_is_incomplete(tmp_path, trained):
    step, state, _ = trained
    _three_steps(tmp_path / "ckpt", trained)
    (tmp_path / "ckpt" / "3" / "data_state" / "metadata").unlink()
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 2
        with pytest.warns(CorruptCheckpointWarning, match="step 3"):
            assert ckpt.restore(step.abstract_state())[2] == 2


KILLED_SAVE = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from jaxlm.checkpoints.train_state import TrainCheckpointer
    ckpt = TrainCheckpointer(sys.argv[1], async_save=True)
    big = {"w": jnp.ones((4096, 4096), jnp.float32) * 7}   # 64 MiB: the write outlives the kill
    ckpt.save(1, {"w": jnp.ones((4, 4))}, {"index": 1}); ckpt.wait()
    ckpt.save(2, big, {"index": 2})
    os._exit(9)  # killed mid-save: no commit
""")


def test_save_killed_midway_is_invisible_and_cleaned_up(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
    committed = sorted(p.name for p in directory.iterdir() if p.name.isdigit())
    assert committed == ["1"] and leftovers == ["2.orbax-checkpoint-tmp"], (committed, leftovers)
    with TrainCheckpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1
        abstract = {"w": jax.ShapeDtypeStruct((4, 4), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
        restored, data_state, at = ckpt.restore(abstract)
        assert at == 1 and data_state == {"index": 1} and np.all(np.asarray(restored["w"]) == 1)
    assert not [p for p in directory.iterdir() if "tmp" in p.name]  # unfinished save removed on reopen


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(CheckpointError, match="keep_last"):
        TrainCheckpointer(tmp_path / "x", keep_last=0)
    with TrainCheckpointer(tmp_path / "y") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
            ckpt.restore({"w": jax.ShapeDtypeStruct((1,), np.float32)}, step=7)
