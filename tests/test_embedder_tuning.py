"""Aligned instruction encoder: contrastive tuning of all-MiniLM-L6-v2 on real Super-NI instructions."""

from __future__ import annotations

import json
from argparse import Namespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.checkpoints.pretrained import export_hf
from jaxlm.commands.data import cmd_align
from jaxlm.data.selection import instruction_groups, load_encoder
from jaxlm.data.sources import load_tasks
from jaxlm.errors import DataError, UsageError
from jaxlm.models.embedder import SentenceEmbedder
from jaxlm.train.embedder_tuning import group_loss, info_nce_loss, tune_embedder

MAX_LENGTH = 32
TUNING = dict(steps=8, batch_size=8, learning_rate=1e-4, temperature=0.05, seed=0, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def minilm():
    return jaxlm.load_pretrained("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def tasks(shared_data):
    """30 real training tasks: up to 3 from each category that has at least 2 (outside mmmlu)."""
    train = load_tasks("superni", shared_data, part="train")
    by_category: dict[str, list[str]] = {}
    for name, task in train.items():
        if "_mmmlu_" not in name and task.categories:
            by_category.setdefault(task.categories[0], []).append(name)
    chosen = [n for names in sorted(by_category.values(), key=lambda v: (-len(v), v[0])) if len(names) >= 2 for n in names[:3]]
    return {n: train[n] for n in chosen[:30]}


def embed(embedder: SentenceEmbedder, params, texts) -> np.ndarray:
    """Embeddings under `params` with one SentenceEmbedder (its jit takes params as an argument: no recompiles)."""
    embedder.params = params
    return embedder.embed(texts, max_length=MAX_LENGTH)


def group_gap(embedder: SentenceEmbedder, params, groups) -> float:
    """Mean cosine of same-group text pairs minus mean cosine of different-group pairs."""
    texts = [t for g in groups for t in g]
    labels = np.array([i for i, g in enumerate(groups) for _ in g])
    emb = embed(embedder, params, texts)
    cos = emb @ emb.T
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(texts), dtype=bool)
    return float(cos[same].mean() - cos[labels[:, None] != labels[None, :]].mean())


def test_info_nce_loss_matches_numpy():
    rng = np.random.default_rng(0)
    a, p = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 5, 8)))
    logits = a @ p.T / 0.1
    log_softmax = lambda z: z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = -0.5 * (np.diag(log_softmax(logits)).mean() + np.diag(log_softmax(logits.T)).mean())
    np.testing.assert_allclose(float(info_nce_loss(jnp.asarray(a), jnp.asarray(p), 0.1)), expected, rtol=1e-5)


@pytest.mark.slow
def test_tuning_aligns_same_category_instructions_and_round_trips(minilm, tasks, tmp_path):
    groups = instruction_groups(tasks, by="category")
    assert len(tasks) == 30 and len(groups) >= TUNING["batch_size"]
    before_params = jax.tree_util.tree_map(np.array, minilm.params)

    tuned, losses = tune_embedder(minilm, groups, **TUNING)
    assert len(losses) == TUNING["steps"] and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.25 * np.mean(losses[:3]), losses
    loss_before = group_loss(minilm, groups, temperature=0.05, max_length=MAX_LENGTH)
    loss_after = group_loss(tuned, groups, temperature=0.05, max_length=MAX_LENGTH)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    embedder = SentenceEmbedder(minilm)
    gap_before, gap_after = group_gap(embedder, minilm.params, groups), group_gap(embedder, tuned.params, groups)
    assert gap_after > gap_before + 0.1, (gap_before, gap_after)
    # The input encoder is untouched (the step donates a copy).
    jax.tree_util.tree_map(np.testing.assert_array_equal, before_params, jax.tree_util.tree_map(np.array, minilm.params))

    # Same seed, same batches: the first steps repeat bit for bit.
    _, again = tune_embedder(minilm, groups, **{**TUNING, "steps": 2})
    assert again == losses[:2]

    # Saved as a HF directory (what `--encoder DIR` reads), reloaded with identical embeddings.
    export_hf(tuned, tmp_path / "aligned")
    reloaded = jaxlm.load_pretrained(tmp_path / "aligned")
    texts = [t for g in groups for t in g]
    np.testing.assert_allclose(embed(embedder, reloaded.params, texts), embed(embedder, tuned.params, texts), atol=1e-6)
    encoder = load_encoder(str(tmp_path / "aligned"))
    assert encoder.model_id.startswith("aligned-") and encoder.model_id != load_encoder(None).model_id
    jax.tree_util.tree_map(np.testing.assert_array_equal, encoder.embedder.params, reloaded.params)


def test_align_encoder_command_writes_a_loadable_encoder(shared_data, tmp_path, capsys):
    """`jaxlm align-encoder` (`cmd_align` -> `embedder_tuning.align_encoder`) on every real training task (one group of views per task); the same
    hyperparameters and shapes as above, so the jitted step is reused from the cache."""
    args = Namespace(data_dir=str(shared_data), source="superni", split="default", output_dir=str(tmp_path / "enc"),
                     group_by="task", steps=2, batch_size=TUNING["batch_size"], learning_rate=TUNING["learning_rate"],
                     temperature=TUNING["temperature"], seed=0, max_length=MAX_LENGTH)
    assert cmd_align(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 2 and 150 < report["groups"] <= 204 and report["first_loss"] > 0
    reloaded = jaxlm.load_pretrained(tmp_path / "enc")
    assert reloaded.family == "bert" and reloaded.config.hidden_size == 384
    with pytest.raises(UsageError, match="by 'source'"):
        cmd_align(Namespace(**{**vars(args), "group_by": "source"}))


def test_bad_groups_and_settings_are_named(minilm, tasks):
    groups = instruction_groups(tasks, by="category")
    with pytest.raises(DataError, match="no instruction group"):
        tune_embedder(minilm, [["same text", "same text"]], steps=1, batch_size=2)
    with pytest.raises(UsageError, match="batch_size"):
        tune_embedder(minilm, groups, steps=1, batch_size=len(groups) + 1)
    with pytest.raises(UsageError, match="temperature"):
        tune_embedder(minilm, groups, steps=1, batch_size=2, temperature=0.0)
