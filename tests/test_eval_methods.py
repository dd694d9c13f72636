"""Evaluation methods on real tasks from ../shared/data: the exact prompt strings each method sends
(through a recording engine), the ICIL cut and K, cross-task majority votes, pseudo-labels, rank
classification, and the adapter method with LoRA teachers against the engine run per task."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

from jaxlm.data.schema import Demo
from jaxlm.eval import methods
from jaxlm.eval.engine import GenerateResult
from jaxlm.checkpoints.pretrained import load_tokenizer
from jaxlm.eval.sweep import split_instances
from jaxlm.errors import ConfigError

COPA = "task1393_superglue_copa_text_completion"
TOPIC = "task645_summarization"
SOURCES = ("task227_clariq_classification", "task1289_trec_classification", "task1146_country_capital")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def load(shared_data):
    from jaxlm.data.sources import load_tasks

    @functools.cache
    def cached(source, part=None, names=None):
        return load_tasks(source, shared_data, part=part, names=names, english_only=True)

    return lambda source, part=None, names=None: cached(source, part, None if names is None else tuple(names))


class RecordingEngine:
    """Stands in for `Engine`: records each decoded prompt and answers with `respond(prompt)`."""

    def __init__(self, tokenizer, respond, scores=None):
        self.tokenizer, self.respond, self.scores = tokenizer, respond, scores
        self.pretrained = dataclasses.make_dataclass("P", ["family"])("llama")
        self.prompts, self.options, self.loras = [], [], []

    def generate(self, prompts, max_new_tokens, stop_sequences=(), lora=None):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.prompts += texts
        self.loras.append(lora)
        return [GenerateResult(self.tokenizer.encode(self.respond(t), add_special_tokens=False)) for t in texts]

    def rank_classify(self, inputs, options, lora=None):
        self.prompts += [self.tokenizer.decode(p) for p in inputs]
        self.options += [[self.tokenizer.decode(o) for o in opts] for opts in options]
        return [self.scores(self.tokenizer.decode(p), len(o)) for p, o in zip(inputs, options)]


class RandomEmbedder:
    def embed(self, texts, batch_size=64):
        rng = np.random.default_rng(len(texts))
        return rng.normal(size=(len(texts), 8)).astype(np.float32)


def context(tokenizer, load, respond, scores=None, **kw):
    engine = RecordingEngine(tokenizer, respond, scores)
    return methods.EvalContext(engine, tokenizer, load, embedder=RandomEmbedder(), **kw), engine


def tk(text: str) -> str:  # hand-written Tk-Instruct punctuation rule
    return text if text[-1] in ".?!,;:'\")]}" else text + "."


def test_def_and_def_pos2_prompts_are_tk_instruct_strings(tokenizer, load):
    task = load("superni", "test", (TOPIC,))[TOPIC]
    evaluated, _ = split_instances(task, 2)
    ctx, engine = context(tokenizer, load, lambda p: " lata mondal\n\nDefinition: next")
    out = methods.Prompted("def").run(ctx, task, evaluated, (), 0)
    definition = f"Definition: {tk(task.definition.strip())}\n\n"
    queries = [f"Now complete the following example -\nInput: {tk(i.input.strip())}\nOutput: " for i in evaluated]
    assert engine.prompts == [definition + q for q in queries]
    assert [r["prediction"] for r in out.records] == ["lata mondal", "lata mondal"]  # cut at the blank line
    assert out.records[0]["references"] == list(evaluated[0].outputs) and out.records[0]["task"] == TOPIC

    engine.prompts.clear()
    methods.Prompted("def_pos2").run(ctx, task, evaluated, (), 0)
    pos = "".join(f" Positive Example {n} -\nInput: {tk(d.input.strip())}\n Output: {tk(d.output.strip())}\n\n"
                  for n, d in enumerate(task.positive_examples[:2], 1))
    assert engine.prompts == [definition + pos + q for q in queries]


def test_fewshot_uses_positive_examples_else_the_pool(tokenizer, load):
    task = load("superni", "test", (COPA,))[COPA]
    evaluated, pool = split_instances(task, 2)
    ctx, engine = context(tokenizer, load, lambda p: "A")
    methods.FewShot(k=3).run(ctx, task, evaluated, pool, 0)  # 3 positive examples: used in order
    demos = "".join(f"Input: {d.input.strip()}\nOutput: {d.output.strip()}\n\n" for d in task.positive_examples[:3])
    assert engine.prompts[0] == demos + f"Input: {evaluated[0].input.strip()}\nOutput: "
    engine.prompts.clear()
    out = methods.FewShot(k=5).run(ctx, task, evaluated, pool, 7)  # only 3: 5 seeded pool instances instead
    shown = re.findall(r"Input: (.*?)\nOutput: (.*?)\n\n", engine.prompts[0], flags=re.DOTALL)
    assert len(shown) == 5 and out.info == {"num_demos": 5}
    by_input = {i.input.strip(): i.outputs[0] for i in pool}
    assert all(by_input[x] == y for x, y in shown)  # gold labels of pool instances, never evaluated ones
    assert not {x for x, _ in shown} & {i.input.strip() for i in evaluated}


def test_icil_prompt_uses_the_k_the_data_allows_and_cuts_at_blank_line(tokenizer, load, tmp_path):
    from jaxlm.data.icil import build_icil_demos

    task = load("superni", "test", (COPA,))[COPA]
    evaluated, _ = split_instances(task, 2)
    ctx, engine = context(tokenizer, load, lambda p: " B \n\nDefinition: more", workdir=tmp_path)
    method = methods.ICIL(k=8)
    out = method.run(ctx, task, evaluated, (), 0)
    k = out.info["k_used"]
    assert out.info["k_asked"] == 8 and 1 <= k < 8  # 8 cannot be built from the partial Super-NI on disk
    def count(s):
        return len(tokenizer.encode(s))

    with pytest.raises(Exception, match=f"only {k} of"):
        build_icil_demos(load("superni", "train"), k=k + 1, seed=0, count_tokens=count)
    demos = build_icil_demos(load("superni", "train"), k=k, seed=0, count_tokens=count)
    blocks = [f"Definition: {d['definition']}\n\nInput: {d['input']}\nOutput: {d['output']}" for d in demos.demos]
    for inst, prompt in zip(evaluated, engine.prompts):
        assert prompt == "\n\n".join(blocks + [f"Definition: {task.definition.strip()}\n\nInput: {inst.input.strip()}\nOutput: "])
    assert [r["prediction"] for r in out.records] == ["B", "B"]
    assert (tmp_path / "icil" / "seed0.json").is_file() and out.info["demo_tasks"] == demos.tasks


def test_icil_with_the_published_demonstration_files(tokenizer, load, shared_data, tmp_path):
    import json

    from jaxlm.data.icil import ICILDemoSet

    task = load("superni", "test", (COPA,))[COPA]
    evaluated, _ = split_instances(task, 2)
    ctx, engine = context(tokenizer, load, lambda p: " B \n\nDefinition: more", workdir=tmp_path, max_source_length=4096)
    pattern = str(shared_data / "icil_demos" / "ICIL_seed{seed}.json")
    method = methods.ICIL(k=8, demo_file=pattern)
    for seed in (1, 2):
        engine.prompts.clear()
        out = method.run(ctx, task, evaluated, (), seed)
        published = json.loads((shared_data / "icil_demos" / f"ICIL_seed{seed}.json").read_text())["demo"]
        assert len(published) == 8 and out.info["k_used"] == 8
        targets = [f"Definition: {task.definition.strip()}\n\nInput: {i.input.strip()}\nOutput: " for i in evaluated]
        assert engine.prompts == ["\n\n".join(published + [t]) for t in targets]  # the paper's prompt, verbatim
        assert [r["prediction"] for r in out.records] == ["B", "B"]
        assert ICILDemoSet.from_json(tmp_path / "icil" / f"seed{seed}.json").demo_strings() == published
    engine.prompts.clear()
    methods.ICIL(k=3, demo_file=pattern).run(ctx, task, evaluated[:1], (), 3)
    assert engine.prompts[0].count("Definition: ") == 4  # the first 3 demonstrations + the target
    with pytest.raises(ConfigError, match="ICIL.k=9: .*ICIL_seed1.json holds 8 demonstrations"):
        methods.ICIL(k=9, demo_file=pattern).run(ctx, task, evaluated, (), 1)
    with pytest.raises(ConfigError, match="ICIL.demo_file=.*ICIL_seed11.json does not exist"):
        methods.ICIL(demo_file=pattern).run(ctx, task, evaluated, (), 11)


def _one_instance_sources(load):
    """The source tasks cut to one labelled instance each: the retrieved example is then known."""
    full = load("superni", None, SOURCES)
    return {n: dataclasses.replace(t, instances=t.instances[:1]) for n, t in full.items()}


def test_crosstask_prompts_votes_mean_and_per_source(tokenizer, load):
    sources = _one_instance_sources(load)
    task = load("superni", "test", (COPA,))[COPA]
    evaluated, _ = split_instances(task, 3)
    answer = {SOURCES[0]: "A", SOURCES[1]: "B", SOURCES[2]: "A"}

    def respond(prompt):  # each source's definition leads to its own answer (after a newline), then a new line
        src = next(n for n, t in sources.items() if prompt.startswith(f"Definition: {t.definition.strip()}\n"))
        return f"\n {answer[src]}\nInput: junk"

    ctx, engine = context(tokenizer, lambda s, part=None, names=None: {n: sources[n] for n in names}, respond)
    out = methods.CrossTask(sources=SOURCES).run(ctx, task, evaluated, (), 0)
    expected = []
    for name in SOURCES:
        src, demo = sources[name], sources[name].instances[0]
        for inst in evaluated:
            expected.append(f"Definition: {src.definition.strip()}\nInput: {demo.input.strip()}\nOutput: "
                            f"{demo.outputs[0].strip()}\nDefinition: {task.definition.strip()}\n"
                            f"Input: {inst.input.strip()}\nOutput: ")
    assert engine.prompts == expected
    assert out.by_source == {n: [answer[n]] * 3 for n in SOURCES}
    assert [r["prediction"] for r in out.records] == ["A"] * 3  # 2 of 3 sources
    assert out.records[0]["sources"][SOURCES[1]]["prediction"] == "B"

    two = methods.CrossTask(sources=SOURCES, num_sources=2).run(ctx, task, evaluated[:1], (), 0)
    assert list(two.by_source) == list(SOURCES[:2]) and two.records[0]["prediction"] == "A"  # tie: first source


def test_majority_votes_hand_cases():
    assert methods.majority_votes({"a": ["x", "y", " z"], "b": ["y", "y", "w"], "c": ["y", "q", "z "]}) == ["y", "y", "z"]
    assert methods.majority_votes({"a": ["p"], "b": ["q"]}) == ["p"]  # a tie goes to the first source
    assert methods.majority_votes({"a": ["1", "2"], "b": ["2", "2"], "c": ["3", "1"], "d": ["3", "1"]}) == ["3", "2"]


def test_pseudo_labels_are_votes_shown_as_in_task_demos(tokenizer, load):
    sources = _one_instance_sources(load)
    task = load("superni", "test", (COPA,))[COPA]
    evaluated, pool = split_instances(task, 2)
    label = {SOURCES[0]: "A", SOURCES[1]: "B", SOURCES[2]: "B"}

    def respond(prompt):
        src = next(n for n, t in sources.items() if prompt.startswith(f"Definition: {t.definition.strip()}\n"))
        return label[src] if prompt.count("Input: ") == 2 else f"{label[src]}!"  # one-shot vs with demos

    ctx, engine = context(tokenizer, lambda s, part=None, names=None: {n: sources[n] for n in names}, respond)
    out = methods.PseudoLabels(sources=SOURCES, num_labels=2).run(ctx, task, evaluated, pool, 3)
    pseudo = out.info["pseudo_labels"]
    assert [p["label"] for p in pseudo] == ["B", "B"]  # majority of A, B, B
    pool_inputs = {i.input for i in pool}
    assert all(p["input"] in pool_inputs for p in pseudo) and len({p["input"] for p in pseudo}) == 2
    final = engine.prompts[2 * len(SOURCES):]  # after the 2 unlabelled inputs x 3 sources
    assert len(final) == len(SOURCES) * len(evaluated)
    demo_lines = "".join(f"Input: {p['input'].strip()}\nOutput: B\n" for p in pseudo)
    for prompt, inst in zip(final, list(evaluated) * len(SOURCES)):
        assert prompt.endswith(f"\nDefinition: {task.definition.strip()}\n{demo_lines}Input: {inst.input.strip()}\nOutput: ")
    assert [r["prediction"] for r in out.records] == ["B!", "B!"]


def test_multiple_choice_is_ranked_over_options(tokenizer, load):
    task = load("bbh", None, ("sports_understanding",))["sports_understanding"]
    evaluated = task.instances[:4]
    ctx, engine = context(tokenizer, load, lambda p: "unused", scores=lambda prompt, n: [0.0, -1.0][:n])
    out = methods.Prompted("bigbench").run(ctx, task, evaluated, (), 0)
    assert engine.prompts == [f"Q: {i.input}\nA: " for i in evaluated]  # BBH's "Q: ...\nA: " form
    assert engine.options == [list(i.options) for i in evaluated] and engine.options[0] == ["yes", "no"]
    assert [r["prediction"] for r in out.records] == ["yes"] * 4
    assert out.records[0]["option_logprobs"] == [0.0, -1.0] and out.records[0]["options"] == ["yes", "no"]


# ----------------------------------------------------------------------------- adapters (real tiny model)

@pytest.fixture(scope="module")
def tiny(tokenizer):
    from jaxlm.checkpoints.pretrained import Pretrained, init_params
    from jaxlm.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, max_position_embeddings=512)
    return Pretrained("llama", config, init_params("llama", config, 0), tokenizer, "random-init")


@pytest.mark.slow
def test_adapter_with_teachers_equals_the_engine_per_task(tiny, load, tmp_path):
    from jaxlm.eval.engine import Engine
    from jaxlm.models import lora as lora_lib
    from jaxlm.train.objectives import LoRATeachers

    names = [TOPIC, "sports_understanding"]
    spec = lora_lib.LoraSpec(("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)
    fresh = lora_lib.init_lora(spec, tiny.params, jax.random.PRNGKey(1), batch_size=2)
    params = jax.tree_util.tree_map_with_path(  # B != 0, so each teacher changes the model
        lambda p, x: jax.random.normal(jax.random.PRNGKey(len(p)), x.shape) * 3.0 if p[-1].key == "b" else x, fresh.params)
    teachers = LoRATeachers(model_config=tiny.config, lora=spec, num_tasks=2)
    teachers.save_teachers(tmp_path / "teachers", params, names, tiny)

    engine = Engine(tiny, batch_size=4)
    ctx = methods.EvalContext(engine, tiny.tokenizer, load, max_new_tokens=5, max_source_length=128)
    method = methods.Adapter(teachers=str(tmp_path / "teachers"))
    tasks = [load("superni", "test", (TOPIC,))[TOPIC], load("bbh", None, ("sports_understanding",))["sports_understanding"]]
    for index, task in enumerate(tasks):
        evaluated = task.instances[:3]
        out = method.run(ctx, task, evaluated, (), 0)
        assert [r["prompt"] for r in out.records] == [i.input.strip() for i in evaluated]  # no instruction
        teacher = lora_lib.select(lora_lib.LoraWeights(params, spec.rank, spec.alpha), index)
        ids = [tiny.tokenizer.encode(i.input.strip())[:128] for i in evaluated]
        if task.source == "bbh":  # multiple choice: rank the options with that teacher
            opts = [[tiny.tokenizer.encode(o, add_special_tokens=False) for o in i.options] for i in evaluated]
            direct = engine.rank_classify(ids, opts, lora=teacher)
            np.testing.assert_allclose([r["option_logprobs"] for r in out.records], direct, atol=1e-5)
            assert direct != engine.rank_classify(ids, opts)  # the teacher matters
        else:
            stops = ctx.stop_ids("\n\n")
            direct = [methods.cut_at(tiny.tokenizer.decode(g.output_ids), "\n\n")
                      for g in engine.generate(ids, 5, stops, lora=teacher)]
            assert [r["prediction"] for r in out.records] == direct
            base = [tiny.tokenizer.decode(g.output_ids) for g in engine.generate(ids, 5, stops)]
            assert [r["prediction"] for r in out.records] != [methods.cut_at(b, "\n\n") for b in base]
    with pytest.raises(Exception, match="no teacher for task"):
        method.run(ctx, dataclasses.replace(tasks[0], name="other"), tasks[0].instances[:1], (), 0)


def test_method_config_errors():
    import gin

    from jaxlm.errors import ConfigError

    gin.clear_config()  # unbound defaults, whatever config an earlier test parsed

    with pytest.raises(ConfigError, match="Prompted.fmt 'fewshot'"):
        methods.Prompted("fewshot")
    with pytest.raises(ConfigError, match="CrossTask.sources"):
        methods.CrossTask()
    with pytest.raises(ConfigError, match="exactly one of Adapter.teachers"):
        methods.Adapter()
    assert methods.labelled_demos(dataclasses.make_dataclass("T", ["positive_examples"])((Demo("x", "y"),)), [], 1, 0) \
        == [Demo("x", "y")]


class StubHypernet:
    """Stands in for a loaded TAGI hypernetwork: one fixed adapter per instruction, calls counted."""

    def __init__(self, by_instruction, rank, alpha, prefix_fusion=False, tokenizer=None):
        self.by_instruction, self.rank, self.alpha, self.calls = by_instruction, rank, alpha, []
        self.instruction_format = {"codec": "bytes", "teacher_format": "def", "student_format": "query"}
        self.prefix_fusion, self.tokenizer = prefix_fusion, tokenizer
        self.config = type("Config", (), {"fusion": prefix_fusion})()

    def adapters(self, instructions, max_tokens=None):
        from jaxlm.models import lora as lora_lib

        self.calls.append(list(instructions))
        return lora_lib.stack([lora_lib.LoraWeights(self.by_instruction[i], self.rank, self.alpha) for i in instructions])

    def tokenize(self, instruction, max_tokens=None):
        return self.tokenizer.encode(instruction, add_special_tokens=False)[:max_tokens]


def test_generated_adapters_run_once_per_task_and_are_cached_on_disk(tiny, load, tmp_path):
    from jaxlm.data.prompts import instruction_text
    from jaxlm.eval.engine import Engine
    from jaxlm.models import lora as lora_lib

    task = load("superni", "test", (TOPIC,))[TOPIC]
    spec = lora_lib.LoraSpec(("q_proj", "v_proj"), rank=2, alpha=4.0)
    fresh = lora_lib.init_lora(spec, tiny.params, jax.random.PRNGKey(2))
    params = jax.tree_util.tree_map(lambda x: x + 0.5, fresh.params)
    hyper = StubHypernet({instruction_text(task): params}, spec.rank, spec.alpha)
    engine = Engine(tiny, batch_size=4)
    ctx = methods.EvalContext(engine, tiny.tokenizer, load, max_new_tokens=4, max_source_length=128, workdir=tmp_path)
    first = methods.Adapter(hypernet=str(tmp_path / "hyper"))
    first._hypernet = hyper
    out = first.run(ctx, task, task.instances[:3], (), 0)
    out_again = first.run(ctx, task, task.instances[3:5], (), 0)
    assert hyper.calls == [[instruction_text(task)]]  # `def`-trained: the bare definition, once
    assert out.records[0]["prompt"] == f"Now complete the following example -\nInput: {tk(task.instances[0].input.strip())}\nOutput: "
    (cached,) = (tmp_path / "adapters").glob(f"*/{TOPIC}.msgpack")
    second = methods.Adapter(hypernet=str(tmp_path / "hyper"))
    second._hypernet = StubHypernet({}, spec.rank, spec.alpha)  # would fail if asked: the disk cache answers
    assert second.run(ctx, task, task.instances[:3], (), 0).records == out.records
    assert second._hypernet.calls == [] and cached.is_file() and len(out_again.records) == 2
    ids = [tiny.tokenizer.encode(r["prompt"]) for r in out.records]
    direct = engine.generate(ids, 4, ctx.stop_ids("\n\n"), lora=lora_lib.LoraWeights(params, spec.rank, spec.alpha))
    assert [r["prediction"] for r in out.records] == [methods.cut_at(tiny.tokenizer.decode(g.output_ids), "\n\n")
                                                      for g in direct]


def test_fusion_hypernet_adapter_reads_the_instruction_as_a_prompt_prefix(tiny, load, tmp_path):
    """A decoder-only fusion hypernetwork: every prompt is [instruction tokens (cut as in training);
    the query's last max_input_tokens tokens (the batches' cut)], run with the task's generated
    adapter, i.e. what training's cached prefix computes."""
    from jaxlm.data.prompts import instruction_text
    from jaxlm.eval.engine import Engine
    from jaxlm.models import lora as lora_lib

    task = load("superni", "test", (TOPIC,))[TOPIC]
    spec = lora_lib.LoraSpec(("q_proj", "v_proj"), rank=2, alpha=4.0)
    fresh = lora_lib.init_lora(spec, tiny.params, jax.random.PRNGKey(2))
    params = jax.tree_util.tree_map(lambda x: x + 0.5, fresh.params)
    instruction = instruction_text(task)
    engine = Engine(tiny, batch_size=4)
    ctx = methods.EvalContext(engine, tiny.tokenizer, load, max_new_tokens=4, max_source_length=128)
    method = methods.Adapter(hypernet=str(tmp_path / "hyper"), max_instruction_tokens=24, max_input_tokens=12)
    method._hypernet = StubHypernet({instruction: params}, spec.rank, spec.alpha, prefix_fusion=True,
                                    tokenizer=tiny.tokenizer)
    evaluated = task.instances[:3]
    out = method.run(ctx, task, evaluated, (), 0)
    prefix = tiny.tokenizer.encode(instruction, add_special_tokens=False)[:24]
    assert method.prefix_ids(task) == prefix and len(prefix) == 24
    ids = [prefix + tiny.tokenizer.encode(r["prompt"])[-12:] for r in out.records]  # cut as training cuts rows
    assert all(len(tiny.tokenizer.encode(r["prompt"])) > 12 for r in out.records)
    lora = lora_lib.LoraWeights(params, spec.rank, spec.alpha)
    stops = ctx.stop_ids("\n\n")
    direct = [methods.cut_at(tiny.tokenizer.decode(g.output_ids), "\n\n") for g in engine.generate(ids, 4, stops, lora=lora)]
    assert [r["prediction"] for r in out.records] == direct
    bare = [g.output_ids for g in engine.generate([i[24:] for i in ids], 4, stops, lora=lora)]
    assert [g.output_ids for g in engine.generate(ids, 4, stops, lora=lora)] != bare  # the prefix is read


def test_cross_fitted_fold_teachers_score_each_instance_with_its_fold(tiny, load, tmp_path):
    """fold_teachers: instances 0-1 with fold A's teacher, 2-3 with fold B's (each trained elsewhere);
    an instance in no fold, overlapping folds and a malformed fold are refused by name."""
    from jaxlm.eval.engine import Engine
    from jaxlm.models import lora as lora_lib
    from jaxlm.train.objectives import LoRATeachers

    spec = lora_lib.LoraSpec(("q_proj", "v_proj"), rank=2, alpha=4.0)
    teachers = LoRATeachers(model_config=tiny.config, lora=spec, num_tasks=1)
    loras = []
    for fold, seed in (("a", 3), ("b", 4)):
        fresh = lora_lib.init_lora(spec, tiny.params, jax.random.PRNGKey(seed), batch_size=1)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x, seed=seed: jax.random.normal(jax.random.PRNGKey(seed + len(p)), x.shape) * 3.0
            if p[-1].key == "b" else x, fresh.params)
        teachers.save_teachers(tmp_path / fold, params, [TOPIC], tiny)
        loras.append(lora_lib.select(lora_lib.LoraWeights(params, spec.rank, spec.alpha), 0))
    task = load("superni", "test", (TOPIC,))[TOPIC]
    evaluated = task.instances[:4]
    engine = Engine(tiny, batch_size=4)
    ctx = methods.EvalContext(engine, tiny.tokenizer, load, max_new_tokens=5, max_source_length=128)
    method = methods.Adapter(fold_teachers=((str(tmp_path / "b"), 2, 4), (str(tmp_path / "a"), 0, 2)))
    out = method.run(ctx, task, evaluated, (), 0)
    ids = [tiny.tokenizer.encode(i.input.strip())[:128] for i in evaluated]
    stops = ctx.stop_ids("\n\n")
    expect = [methods.cut_at(tiny.tokenizer.decode(g.output_ids), "\n\n")
              for lora, rows in ((loras[0], ids[:2]), (loras[1], ids[2:])) for g in engine.generate(rows, 5, stops, lora=lora)]
    assert [r["prediction"] for r in out.records] == expect
    assert [r["id"] for r in out.records] == [i.id for i in evaluated]
    swapped = [methods.cut_at(tiny.tokenizer.decode(g.output_ids), "\n\n")
               for lora, rows in ((loras[1], ids[:2]), (loras[0], ids[2:])) for g in engine.generate(rows, 5, stops, lora=lora)]
    assert swapped != expect  # the fold decides the teacher
    with pytest.raises(ConfigError, match="evaluated instance 4 of task .* is in no fold"):
        method.run(ctx, task, task.instances[:5], (), 0)
    with pytest.raises(ConfigError, match="overlap"):
        methods.Adapter(fold_teachers=(("a", 0, 3), ("b", 2, 4)))
    with pytest.raises(ConfigError, match=r"is not \(teachers dir, first, stop\)"):
        methods.Adapter(fold_teachers=(("a", 3, 1),))
    with pytest.raises(ConfigError, match="exactly one of"):
        methods.Adapter(teachers="t", fold_teachers=(("a", 0, 3),))


def test_adapter_method_refuses_an_encoder_decoder_fusion_hypernetwork(monkeypatch):
    """T5 fusion joins instruction states to the encoder output, which the sweep does not feed: refused
    by name rather than silently losing the instruction. Decoder-only fusion (a prompt prefix) is fed."""
    import types

    from jaxlm.checkpoints import hypernet as hypernet_lib
    from jaxlm.errors import ConfigError
    from jaxlm.eval.methods import Adapter

    fake = types.SimpleNamespace(config=types.SimpleNamespace(fusion=True), prefix_fusion=False)
    monkeypatch.setattr(hypernet_lib, "load_hypernet", lambda path: fake)
    with pytest.raises(ConfigError, match="Adapter.hypernet runs/h: trained with encoder-decoder instruction fusion"):
        Adapter(hypernet="runs/h").loaded_hypernet()
    fake.prefix_fusion = True
    assert Adapter(hypernet="runs/h").loaded_hypernet() is fake
    fake.config.fusion, fake.prefix_fusion = False, False
    assert Adapter(hypernet="runs/h").loaded_hypernet() is fake
