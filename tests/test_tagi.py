"""TAGI training: grouped data, the objective (instruction read once per task), both stages end to
end on a tiny model, export -> `jaxlm adapter` -> PEFT parity in transformers, resume, config errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.checkpoints.instruction_codec import text_codec
from jaxlm.data import tagi_batches as tb
from jaxlm.data import tagi_tasks as tt
from jaxlm.data.string_rewrite import RewriteConfig, rewrite_tasks
from jaxlm.errors import ConfigError, UsageError
from jaxlm.models.hypernet import HypernetConfig
from jaxlm.models.llama import LlamaConfig
from jaxlm.models.lora import LoraSpec

RULES = RewriteConfig(num_rules=12, examples_per_rule=6, num_heldout_rules=2, alphabet="abcd", z_len=(4, 8))
TINY = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=128, bos_token_id=None, eos_token_ids=(1,))
HYPER = HypernetConfig(lora=LoraSpec(("q_proj", "v_proj"), rank=4, alpha=8.0), width=32, depth=1, num_heads=2)


def _batches(**kw):
    args = {"batch_size": 8, "tasks_per_batch": 4, "max_input_len": 32, "max_target_len": 16,
            "max_instruction_len": 16, "buckets": (16, 32)}
    args.update(kw)
    return tb.tagi_batches(tt.rewrite_tagi_tasks(RULES), text_codec("bytes"), **args)


def test_grouped_batches_layout_and_exact_resume():
    it = _batches()
    b = next(it)
    assert b["instruction_tokens"].shape[0] == 4 and b["decoder_input_tokens"].shape == (8, 32)
    np.testing.assert_array_equal(b["task_index"], [0, 0, 1, 1, 2, 2, 3, 3])
    tasks = {t.name: t for t in tt.rewrite_tagi_tasks(RULES)}
    names = it.batch_tasks({**it.state(), "step": 0, "task_draws": 0, "counters": [0] * len(tasks)})
    assert len(set(names)) == 4  # G distinct tasks within a task epoch
    decode = text_codec("bytes").decode
    for g, name in enumerate(names):
        x = tasks[name].instruction.tolist()
        n = int(b["instruction_mask"][g].sum())
        assert b["instruction_tokens"][g, :n].tolist() == x
        for row in np.flatnonzero(b["task_index"] == g):
            student = decode(b["decoder_input_tokens"][row][b["decoder_segment_ids"][row] > 0])
            teacher = decode(b["teacher_decoder_input_tokens"][row][b["teacher_decoder_segment_ids"][row] > 0])
            rule = decode(x)
            assert teacher == rule + "|" + student  # same example, instruction in context
            # both rows predict the same target tokens
            s_t = b["decoder_target_tokens"][row][b["decoder_loss_weights"][row] > 0]
            t_t = b["teacher_decoder_target_tokens"][row][b["teacher_decoder_loss_weights"][row] > 0]
            np.testing.assert_array_equal(s_t, t_t)
    state = it.state()
    ahead = [next(it) for _ in range(5)]
    fresh = _batches()
    fresh.restore(json.loads(json.dumps(state)))
    for want in ahead:
        got = next(fresh)
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(UsageError, match="tasks_per_batch"):
        _batches(tasks_per_batch=3)


def test_global_task_index_and_passages(tmp_path):
    it = _batches(global_task_index=True, teacher_features=False)
    b = next(it)
    assert "instruction_tokens" not in b and "teacher_decoder_input_tokens" not in b
    assert b["task_index"].max() >= 4  # the task's place in the task list, not in the batch
    tt.write_passages(rewrite_tasks(RULES, part="train"), tmp_path)
    passages = tt.passage_tagi_tasks(tmp_path, first_fraction=0.5, context_tokens=3, min_tokens=8)
    p = passages[1]
    codec = text_codec("bytes")
    text = tt.read_passages(tmp_path)[1]
    ids = codec.encode(text)
    assert p.instruction.tolist() + p.student.targets(0).tolist()[:-1] == ids  # first segment + continuation
    assert p.student.inputs(0).tolist() == p.instruction.tolist()[-3:]


def _objective(**kw):
    from jaxlm.train.tagi import TAGIDistillation

    return TAGIDistillation(**{"model_config": TINY, "hypernet": HYPER, "init_seed": 0, **kw})


def test_hypernet_reads_each_instruction_once_per_task(monkeypatch):
    from jaxlm.models import hypernet as hyper_lib

    objective = _objective(w_kl=1.0)
    trainable, frozen = objective.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in next(_batches()).items()}
    seen = []
    real = hyper_lib.encode_instruction

    def spy(kind, model, params, ids, mask, *rest):
        seen.append(ids.shape)
        return real(kind, model, params, ids, mask, *rest)

    monkeypatch.setattr(hyper_lib, "encode_instruction", spy)
    loss, metrics = jax.jit(objective.loss)(trainable, frozen, batch, jax.random.PRNGKey(1))
    assert seen == [batch["instruction_tokens"].shape] and seen[0][0] == 4 != batch["task_index"].shape[0]
    assert {"loss_ce", "loss_kl", "accuracy"} <= set(metrics) and np.isfinite(float(loss))
    # dW = 0 at init: the student is the base model, so L_ce equals the base's CE on the student rows
    logits = objective.model.apply({"params": frozen["base"]}, batch["decoder_input_tokens"])
    from jaxlm.train import losses

    total, weight = losses.weighted_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    np.testing.assert_allclose(float(metrics["loss_ce"]), float(total / weight), rtol=1e-5)


def test_decoder_only_fusion_reads_the_instruction_as_a_cached_prefix():
    """Llama fusion: each example attends to its task's instruction tokens (keys/values computed once per
    task). With random non-zero heads, L_ce equals a plain forward over [instruction; row] with the same
    per-task adapter, row by row; with fusion off it does not."""
    from jaxlm.models import lora as lora_lib
    from jaxlm.train import losses

    fused = _objective(hypernet=dataclasses.replace(HYPER, fusion=True))
    trainable, frozen = fused.init(jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 256))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), trainable)
    batch = {k: jnp.asarray(v) for k, v in next(_batches()).items()}
    _, metrics = jax.jit(fused.loss)(trainable, frozen, batch, jax.random.PRNGKey(1))
    lora_G, _ = fused.emit_lora(trainable, frozen, batch["instruction_tokens"], batch["instruction_mask"])
    total = weight = 0.0
    for b in range(batch["task_index"].shape[0]):
        g = int(batch["task_index"][b])
        instr = np.asarray(batch["instruction_tokens"][g])[np.asarray(batch["instruction_mask"][g]) > 0]
        real = np.asarray(batch["decoder_segment_ids"][b]) > 0
        row = np.asarray(batch["decoder_input_tokens"][b])[real]
        one = lora_lib.select(lora_G, g)
        logits = fused.model.apply({"params": frozen["base"]}, jnp.asarray([np.concatenate([instr, row])]), lora=one)
        t, w = losses.weighted_cross_entropy(logits[:, len(instr):], batch["decoder_target_tokens"][b:b + 1, real],
                                             batch["decoder_loss_weights"][b:b + 1, real])
        total, weight = total + float(t), weight + float(w)
    np.testing.assert_allclose(float(metrics["loss_ce"]), total / weight, rtol=2e-5)
    with_instruction = fused.student_logits(frozen["base"], batch, lora_G, None)
    without = _objective().student_logits(frozen["base"], batch, lora_G, None)
    real = np.asarray(batch["decoder_segment_ids"]) > 0
    assert np.abs(np.asarray(with_instruction - without))[real].max() > 1e-2


def test_bad_config_raises_config_error_naming_the_binding(tmp_path):
    with pytest.raises(ConfigError, match="TAGIDistillation.w_ce"):
        _objective(w_ce=-1.0)
    with pytest.raises(ConfigError, match="TAGIDistillation.teachers_dir"):
        _objective(teachers_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="TAGIDistillation.w_ins > 0 needs TAGIDistillation.teachers_dir"):
        _objective(w_ins=1.0)
    with pytest.raises(ConfigError, match="TAGIDistillation.init_from"):
        _objective(init_from=str(tmp_path))
    with pytest.raises(ConfigError, match="HypernetConfig.fusion_dim"):
        _objective(hypernet=HypernetConfig(lora=HYPER.lora, width=32, depth=1, num_heads=2, fusion=True, fusion_dim=16))
    from jaxlm.experiment.gin_config import parse_config

    with pytest.raises(ConfigError, match="w_typo"):
        parse_config(["jaxlm/configs/tests/tiny_tagi.gin"], ["TAGIDistillation.w_typo = 1.0"])
    with pytest.raises(ConfigError, match="tagi_data.source"):
        from jaxlm.experiment.data_sources import tagi_data

        tagi_data(source="nope", batch_size=2, tasks_per_batch=1)


@pytest.mark.slow
def test_two_stage_run_lowers_each_loss_exports_and_matches_peft(tmp_path, capsys):
    """tiny_tagi.gin end to end (teachers, stage 1, stage 2) through `jaxlm train`, then `jaxlm adapter`
    and the adapter in transformers + peft reproduces jaxlm's logits."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from jaxlm import cli
    from jaxlm.checkpoints.hypernet import load_hypernet
    from jaxlm.checkpoints.peft import load_peft_adapter

    work = tmp_path / "run"
    assert cli.main(["train", "--gin_file=jaxlm/configs/tests/tiny_tagi.gin", "--workdir", str(work)]) == 0
    first_last = {}
    for stage, keys in (("teachers", ["loss"]), ("stage1", ["loss_ce"]), ("stage2", ["loss_ce", "loss_kl", "loss_ins"])):
        rows = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        for k in keys:
            early = np.mean([r[k] for r in rows[:3]])
            late = np.mean([r[k] for r in rows[-3:]])
            first_last[f"{stage}/{k}"] = (early, late)
    assert all(late < early for early, late in first_last.values()), first_last
    stage2 = [json.loads(line) for line in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
    watched = {"dw_ratio/self_attn.q_proj", "dw_ratio/self_attn.v_proj", "task_share"}
    assert all(watched <= set(r) for r in stage2)  # monitored every logged step
    assert all(0.0 <= r["task_share"] < 1.0 and np.isfinite(r["dw_ratio/self_attn.q_proj"]) for r in stage2)
    assert stage2[-1]["task_share"] > 0.0 and stage2[-1]["dw_ratio/self_attn.v_proj"] > 0.0

    out = tmp_path / "adapter"
    assert cli.main(["adapter", "--hypernet", str(work), "--instruction", "ab|c", "--output", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    hyper = load_hypernet(work)
    assert config["base_model_name_or_path"] == str(hyper.base_model_dir)
    lora = load_peft_adapter(out, hyper.base)
    ids = np.asarray([text_codec("bytes").encode("abcab=")])
    ours = np.asarray(hyper.base.model.apply({"params": hyper.base.params}, jnp.asarray(ids), lora=lora))
    base = np.asarray(hyper.base.model.apply({"params": hyper.base.params}, jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 1e-4  # the generated adapter changes the model
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(config["base_model_name_or_path"]), out).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4
    # different instructions -> different adapters, one hypernetwork pass for the batch
    both = hyper.adapters(["ab|c", "d|bb"])
    leaf = jax.tree_util.tree_leaves(both.params)[0]
    assert leaf.shape[0] == 2 and not np.allclose(leaf[0], leaf[1])
    # a 10,000-character instruction is cut to what the hypernetwork reads, and the command says so
    huge, limit = "ab|c" * 2500, hyper.max_instruction_tokens
    capsys.readouterr()
    assert cli.main(["adapter", "--hypernet", str(work), "--instruction", huge, "--output", str(tmp_path / "huge")]) == 0
    assert f"--instruction has 10000 tokens; the hypernetwork reads the first {limit}" in capsys.readouterr().err
    long_leaf, cut_leaf = (jax.tree_util.tree_leaves(hyper.adapters([text]).params)[0] for text in (huge, huge[:limit]))
    assert limit == 128 and np.array_equal(long_leaf, cut_leaf)  # bytes codec: one token per character


@pytest.mark.slow
def test_stage2_resume_reproduces_uninterrupted_losses(tmp_path):
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.experiment.runner import tagi_pipeline

    def run(workdir, steps, stages=("stage2",)):
        parse_config(["jaxlm/configs/tests/tiny_tagi.gin"], [
            f"tagi_pipeline.stages = {stages!r}", f"stage2/train.num_steps = {steps}",
            "stage2/TAGIDistillation.w_ins = 0.0", "train.checkpoint_every = 2", "make_optimizer.total_steps = 4"])
        return tagi_pipeline(workdir)

    full = run(tmp_path / "a", 4)["losses"]
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert resumed["resumed_from"] == 2
    assert [resumed["losses"][s] for s in (3, 4)] == [full[3], full[4]]


def test_cached_topk_teacher_with_k_equal_v_matches_in_step_kl(tmp_path):
    """write_teacher_topk (.npz) -> TagiBatches(teacher_topk=...) -> topk KL; with k = V it is the same
    KL as the in-step teacher reading the teacher rows (no teacher forward in the step or the loader)."""
    from jaxlm.checkpoints.pretrained import Pretrained
    from jaxlm.train.tagi import write_teacher_topk

    objective = _objective(w_kl=1.0)
    trainable, frozen = objective.init(jax.random.PRNGKey(0))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.sign(x + 0.1), trainable)  # dW != 0
    tasks = tt.rewrite_tagi_tasks(RULES)
    teacher = Pretrained("llama", TINY, frozen["base"], None, "tiny")
    path = write_teacher_topk(tmp_path / "topk.npz", tasks, teacher, k=TINY.vocab_size, max_targets=16, batch_size=4)
    cached = tb.load_teacher_topk(path)
    assert set(cached) == {t.name for t in tasks} and cached[tasks[0].name][0].shape[1:] == (16, TINY.vocab_size)
    in_step = next(_batches())
    with_topk = next(_batches(teacher_topk=cached))
    rng = jax.random.PRNGKey(0)
    loss = jax.jit(objective.loss)
    _, m_step = loss(trainable, frozen, {k: jnp.asarray(v) for k, v in in_step.items()}, rng)
    topk_only = {k: jnp.asarray(v) for k, v in with_topk.items() if not k.startswith("teacher_decoder")}
    _, m_topk = loss(trainable, frozen, topk_only, rng)
    assert float(m_step["loss_kl"]) > 1e-6
    np.testing.assert_allclose(float(m_topk["loss_kl"]), float(m_step["loss_kl"]), rtol=2e-4, atol=1e-7)


def test_cached_topk_teacher_keeps_the_last_max_input_len_tokens(tmp_path):
    """write_teacher_topk(max_input_len=m) reads the teacher row cut as the batches cut it: the last m
    input tokens, then the target; the cached top-k equals the model's own on that row."""
    from jaxlm.checkpoints.pretrained import Pretrained
    from jaxlm.train.tagi import write_teacher_topk

    _, frozen = _objective().init(jax.random.PRNGKey(0))
    teacher = Pretrained("llama", TINY, frozen["base"], None, "tiny")
    task = tt.rewrite_tagi_tasks(RULES)[0]
    ids, logp, valid = tb.load_teacher_topk(write_teacher_topk(
        tmp_path / "topk.npz", [task], teacher, k=5, max_targets=4, batch_size=2, max_input_len=3))[task.name]
    inp, tgt = task.teacher.inputs(0), task.teacher.targets(0)
    assert len(inp) > 3
    t = min(len(tgt), 4)
    row = jnp.asarray(np.concatenate([inp[-3:], tgt])[None])
    full = jax.nn.log_softmax(teacher.model.apply({"params": frozen["base"]}, row, None)[0, 2:2 + t], axis=-1)
    values, index = jax.lax.top_k(full, 5)
    np.testing.assert_allclose(logp[0, :t], np.asarray(values), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ids[0, :t], np.asarray(index))
    np.testing.assert_array_equal(valid[0], [1.0] * t + [0.0] * (4 - t))
    uncut = tb.load_teacher_topk(write_teacher_topk(tmp_path / "uncut.npz", [task], teacher, k=5, max_targets=4,
                                                    batch_size=2))[task.name]
    assert not np.allclose(uncut[1][0, :t], logp[0, :t])  # the cut changes the teacher's context


def test_cached_topk_resumes_from_finished_tasks(tmp_path):
    """A run killed after some tasks keeps them in <path>.parts/; the rerun reads them instead of
    recomputing and writes the same file as an uninterrupted run; the parts are then removed. A run
    with another teacher starts over."""
    import dataclasses

    from jaxlm.checkpoints.pretrained import Pretrained
    from jaxlm.errors import ConfigError
    from jaxlm.train.tagi import write_teacher_topk

    _, frozen = _objective().init(jax.random.PRNGKey(0))
    teacher = Pretrained("llama", TINY, frozen["base"], None, "tiny")
    tasks = tt.rewrite_tagi_tasks(RULES)[:3]
    kw = {"k": 4, "max_targets": 4, "batch_size": 2}
    broken = [tasks[0], dataclasses.replace(tasks[1], teacher=None), tasks[2]]
    with pytest.raises(ConfigError, match="no teacher rows"):
        write_teacher_topk(tmp_path / "topk.npz", broken, teacher, **kw)
    part = tmp_path / "topk.npz.parts" / "00000.npz"
    assert part.is_file() and not (tmp_path / "topk.npz").exists()
    with np.load(part) as z:  # mark the kept part: the rerun must read it, not recompute it
        marked = {key: z[key] for key in z.files}
    marked["logprobs"] = marked["logprobs"] - 1.0
    np.savez(part, **marked)
    # another teacher (here: another source) never reads the parts: it starts over and recomputes
    other = write_teacher_topk(tmp_path / "topk.npz", tasks, dataclasses.replace(teacher, source="tiny-other"), **kw)
    assert not (tmp_path / "topk.npz.parts").exists()
    with np.load(other) as z:
        assert not np.allclose(z[f"{tasks[0].name}/logprobs"], marked["logprobs"])
    (tmp_path / "topk.npz").unlink()
    with pytest.raises(ConfigError, match="no teacher rows"):
        write_teacher_topk(tmp_path / "topk.npz", broken, teacher, **kw)
    np.savez(part, **marked)
    resumed = tb.load_teacher_topk(write_teacher_topk(tmp_path / "topk.npz", tasks, teacher, **kw))
    clean = tb.load_teacher_topk(write_teacher_topk(tmp_path / "clean.npz", tasks, teacher, **kw))
    np.testing.assert_allclose(resumed[tasks[0].name][1], clean[tasks[0].name][1] - 1.0)  # read from the part
    for t in tasks[1:]:
        for got, want in zip(resumed[t.name], clean[t.name]):
            np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "topk.npz.parts").exists() and not (tmp_path / "clean.npz.parts").exists()


def test_t5_with_instruction_fusion_trains_and_paper_config_builds():
    """Encoder-decoder path: grouped encoder/decoder rows, fused instruction states, in-step KL; and
    the paper-faithful gin (frozen T5, LoRA r32 on q/v, fusion) builds its objective."""
    import gin

    from jaxlm.models.t5 import T5Config
    from jaxlm.experiment.gin_config import parse_config
    from jaxlm.train.tagi import TAGIDistillation

    t5 = T5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    hyper = HypernetConfig(lora=LoraSpec(("q", "v"), rank=4, alpha=8.0), width=32, depth=1, num_heads=2, fusion=True)
    objective = TAGIDistillation(model_config=t5, hypernet=hyper, init_seed=0, w_kl=1.0)
    trainable, frozen = objective.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in next(_batches(layout="encoder_decoder")).items()}
    assert "teacher_encoder_input_tokens" in batch
    grad_fn = jax.jit(jax.value_and_grad(lambda p: objective.loss(p, frozen, batch, jax.random.PRNGKey(0)), has_aux=True))
    (loss, metrics), grads = grad_fn(trainable)
    assert np.isfinite(float(loss)) and float(metrics["loss_kl"]) >= 0
    assert float(optax_norm(grads)) > 0

    parse_config(["jaxlm/configs/tagi/paper_t5.gin"])
    with gin.config_scope("stage1"):  # stage 2 also needs the teachers dir that the teachers stage writes
        paper = gin.get_configurable(TAGIDistillation)()
    assert paper.hypernet.fusion and paper.spec.targets == ("q", "v") and paper.spec.rank == 32
    assert gin.query_parameter("stage2/TAGIDistillation.w_ins") == 1.0 and paper.config.family == "t5"
    trainable_axes, _ = paper.logical_axes()
    assert trainable_axes["hypernet"]


def optax_norm(tree):
    import optax

    return optax.tree.norm(tree)


def test_metric_warnings_name_a_runaway_adapter_and_a_collapsed_task_share():
    """The one-line alarms of the TAGI objective: ||dW|| above the base kernel's, and a between-task
    share that fell after having been high; a share that is merely still low early on is no alarm."""
    from jaxlm.train.tagi import TAGIDistillation

    warn = TAGIDistillation.metric_warnings
    assert warn(None, {"loss": 1.0}, {}) == {}
    assert warn(None, {"dw_ratio/self_attn.q_proj": 0.2, "task_share": 0.3}, {"task_share": 0.3}) == {}
    early = {"dw_ratio/self_attn.q_proj": 0.46, "task_share": 0.002}
    assert warn(None, early, {"task_share": 0.002}) == {}  # stage 1's generic adapter at stage 2's start
    both = warn(None, {"dw_ratio/self_attn.q_proj": 3.4, "dw_ratio/self_attn.v_proj": 0.5, "task_share": 0.004},
                {"task_share": 0.12})
    assert set(both) == {"dw_ratio", "task_share"}
    assert "3.40 for self_attn.q_proj" in both["dw_ratio"] and "fell to 0.4% (peak 12.0%)" in both["task_share"]
    assert warn(None, {"dw_ratio/self_attn.q_proj": 0.0, "task_share": 0.0}, {"task_share": 0.2}) == {}  # dW = 0
