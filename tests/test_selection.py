"""INSTA selection on real Super-NI tasks: rankings, family/category recovery, mixture rates, `jaxlm select`."""

from __future__ import annotations

import json
from argparse import Namespace

import numpy as np
import pytest

from jaxlm.commands.data import cmd_select as select_command
from jaxlm.data.selection import (
    TEXT_VIEWS,
    find_task,
    instruction_groups,
    instruction_view,
    load_encoder,
    rank_sources,
    select_top_k,
    selection_mixture_rates,
)
from jaxlm.data.sources import load_tasks
from jaxlm.errors import DataError, UsageError

# Short definitions only: embedding stays within this file's time budget on a shared 2-core CPU.
MAX_DEFINITION_CHARS = 200


@pytest.fixture(scope="module")
def train(shared_data):
    return load_tasks("superni", shared_data, part="train")


@pytest.fixture(scope="module")
def pool(train):
    """Training tasks with short definitions (all the mmmlu_answer_generation_* family among them)."""
    return {n: t for n, t in train.items() if len(t.definition) <= MAX_DEFINITION_CHARS}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def embedder(cache_dir):
    return load_encoder(None, cache_dir)  # each text is embedded once for the whole module


def is_mmmlu(name: str) -> bool:
    return "_mmmlu_answer_generation_" in name


def test_ranking_is_sorted_and_equals_brute_force_cosine(shared_data, pool, embedder):
    target = load_tasks("superni", shared_data, part="test")["task1195_disflqa_disfluent_to_fluent_conversion"]
    ranking = rank_sources(target, pool, embedder=embedder)
    names = [n for n, _ in ranking]
    scores = np.array([s for _, s in ranking])
    assert sorted(names) == sorted(pool) and len(names) == len(pool) > 100
    assert np.all(np.diff(scores) <= 0) and -1.0 <= scores.min() < scores.max() <= 1.0

    # Brute force: every instruction vector, float64 cosine, argsort.
    vectors = embedder.embed([instruction_view(target)] + [instruction_view(pool[n]) for n in pool]).astype(np.float64)
    cosines = [float(np.dot(vectors[0], v) / (np.linalg.norm(vectors[0]) * np.linalg.norm(v))) for v in vectors[1:]]
    expected = [list(pool)[i] for i in np.argsort(-np.array(cosines), kind="stable")]
    assert names == expected
    np.testing.assert_allclose(scores, np.sort(cosines)[::-1], atol=1e-5)

    # A source that is the target itself is never ranked.
    member = next(iter(pool))
    assert member not in [n for n, _ in rank_sources(pool[member], pool, embedder=embedder)]


def test_mmmlu_family_finds_each_other(pool, embedder):
    family = [n for n in pool if is_mmmlu(n)]
    chance = (len(family) - 1) / (len(pool) - 1)
    assert len(family) == 57 and chance < 0.55
    top5 = {n: select_top_k(pool[n], pool, embedder=embedder, k=5) for n in family}
    hit_rate = np.mean([is_mmmlu(s) for tops in top5.values() for s in tops])
    assert hit_rate == 1.0, hit_rate


def test_same_category_and_dataset_ranked_above_chance(pool, embedder):
    """Outside the mmmlu family: the top 3 share a category far more often than a random source does,
    and the top source comes from the same dataset more often than chance."""
    targets = [n for n in pool if not is_mmmlu(n)]
    share_category = lambda a, b: bool(set(pool[a].categories) & set(pool[b].categories))
    same_dataset = lambda a, b: pool[a].metadata.get("Source") == pool[b].metadata.get("Source")
    top_cat, base_cat, top_src, base_src = [], [], [], []
    for name in targets:
        ranked = [n for n, _ in rank_sources(pool[name], pool, embedder=embedder)]
        top_cat += [share_category(name, n) for n in ranked[:3]]
        base_cat += [share_category(name, n) for n in ranked]
        top_src.append(same_dataset(name, ranked[0]))
        base_src += [same_dataset(name, n) for n in ranked]
    assert np.mean(top_cat) > 2.5 * np.mean(base_cat), (np.mean(top_cat), np.mean(base_cat))
    assert np.mean(top_src) > 10 * np.mean(base_src), (np.mean(top_src), np.mean(base_src))


def test_definition_plus_examples_view(pool, embedder):
    mmmlu = [n for n in pool if is_mmmlu(n)][:4]
    others = [n for n in pool if not is_mmmlu(n)][:4]
    small = {n: pool[n] for n in mmmlu + others}
    task = small[mmmlu[0]]
    view = instruction_view(task, "definition+examples")
    assert view.startswith(instruction_view(task, "definition")) and task.positive_examples[1].input.strip()[:40] in view
    with_examples = rank_sources(task, small, embedder=embedder, text="definition+examples")
    definition_only = dict(rank_sources(task, small, embedder=embedder))
    assert all(is_mmmlu(n) for n, _ in with_examples[:2])
    assert all(abs(s - definition_only[n]) > 1e-3 for n, s in with_examples)  # the examples were embedded
    with pytest.raises(UsageError, match="--text"):
        instruction_view(task, "examples")


def test_top_k_and_mixture_rates(train, pool, embedder):
    target = pool["task736_mmmlu_answer_generation_virology"]
    top = select_top_k(target, pool, embedder=embedder, k=4)
    assert top == [n for n, _ in rank_sources(target, pool, embedder=embedder)[:4]]
    rates = selection_mixture_rates(top, train, cap=50)
    assert rates == {n: float(min(len(train[n].instances), 50)) for n in top} and set(rates.values()) == {50.0}
    assert selection_mixture_rates(top, train) == {n: float(len(train[n].instances)) for n in top}
    with pytest.raises(DataError, match="task_missing"):
        selection_mixture_rates(["task_missing"], train)
    with pytest.raises(UsageError, match="--top_k"):
        select_top_k(target, pool, embedder=embedder, k=0)


def test_instruction_groups_from_real_tasks(pool):
    by_task = instruction_groups(pool, by="task")
    task = pool["task736_mmmlu_answer_generation_virology"]
    group = next(g for g in by_task if g[0] == instruction_view(task))
    assert len(group) == 3 and group[2] == instruction_view(task, "definition+examples")
    assert group[1].startswith(group[0]) and group[2].startswith(group[1])
    by_category = instruction_groups(pool, by="category")
    qa = {instruction_view(t) for t in pool.values() if "Question Answering" in t.categories}
    assert len(qa) > 57 and qa in [set(g) for g in by_category] and all(len(g) >= 2 for g in by_category)
    with pytest.raises(UsageError, match="by 'dataset'"):
        instruction_groups(pool, by="dataset")


@pytest.fixture
def mini_superni(tmp_path, shared_data):
    """A Super-NI directory of 8 real training tasks and 1 test task (links, no copies) with split 'mini'."""
    real = shared_data / "superni"
    train = ["task080_piqa_answer_generation", "task081_piqa_wrong_answer_generation",
             "task736_mmmlu_answer_generation_virology", "task725_mmmlu_answer_generation_nutrition",
             "task690_mmmlu_answer_generation_college_medicine", "task067_abductivenli_answer_generation",
             "task059_ropes_story_generation", "task060_ropes_question_generation"]
    test = ["task1195_disflqa_disfluent_to_fluent_conversion"]
    (tmp_path / "tasks").mkdir()
    for name in train + test:
        (tmp_path / "tasks" / f"{name}.json").symlink_to(real / "tasks" / f"{name}.json")
    split = tmp_path / "splits" / "mini"
    split.mkdir(parents=True)
    (split / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (split / "test_tasks.txt").write_text("\n".join(test) + "\n")
    return tmp_path


def select_args(data_dir, target, **kw):
    return Namespace(data_dir=str(data_dir), source="superni", target=target, top_k=kw.get("top_k", 3),
                     encoder=kw.get("encoder"), text=kw.get("text", "definition"), split="mini",
                     cache_dir=kw.get("cache_dir"))


def test_select_command_prints_json_lines(mini_superni, embedder, cache_dir, capsys):
    train = load_tasks("superni", mini_superni, split="mini", part="train")
    target = load_tasks("superni", mini_superni)["task1195_disflqa_disfluent_to_fluent_conversion"]
    expected = rank_sources(target, train, embedder=embedder)  # fills the on-disk cache select reads
    for name in train:
        rank_sources(train[name], train, embedder=embedder)

    assert select_command(select_args(mini_superni, "task736_mmmlu_answer_generation_virology", cache_dir=cache_dir)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert {r["task"] for r in rows[:2]} == {"task725_mmmlu_answer_generation_nutrition",
                                             "task690_mmmlu_answer_generation_college_medicine"}
    assert all(set(r) == {"rank", "task", "score"} and isinstance(r["score"], float) for r in rows)
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]

    # A test-split target is ranked against the split's training tasks only.
    args = select_args(mini_superni, "task1195_disflqa_disfluent_to_fluent_conversion", top_k=20, cache_dir=cache_dir)
    assert select_command(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["task"], r["score"]) for r in rows] == [(n, round(s, 6)) for n, s in expected] and len(rows) == 8


def test_select_command_errors_name_the_flag(mini_superni, tmp_path):
    with pytest.raises(DataError, match=r"--target 'mmmlu_answer_generation_virology'.*did you mean: task736_mmmlu_answer_generation_virology"):
        select_command(select_args(mini_superni, "mmmlu_answer_generation_virology"))
    with pytest.raises(UsageError, match="--encoder"):
        select_command(select_args(mini_superni, "task059_ropes_story_generation", encoder=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="--top_k"):
        select_command(select_args(mini_superni, "task059_ropes_story_generation", top_k=0))
    assert find_task("superni:task059_ropes_story_generation", load_tasks("superni", mini_superni)).name == "task059_ropes_story_generation"
    assert set(TEXT_VIEWS) == {"definition", "definition+examples"}
