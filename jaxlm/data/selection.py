"""INSTA task selection: choose source tasks for instruction tuning by instruction similarity alone.

Every task's instruction (its definition, optionally with its positive examples) is embedded once
with a sentence encoder (all-MiniLM-L6-v2, or an "aligned" encoder fine-tuned on the meta-dataset's
instructions by `jaxlm.train.embedder_tuning`); source tasks are ranked for a target task by cosine
similarity, and the top k become an examples-proportional training mixture. No instance of the
target is looked at, so the target may be an unseen test task.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from jaxlm.data.embedding_cache import CachedEmbedder
from jaxlm.data.prompts import instruction_text
from jaxlm.data.schema import TaskData
from jaxlm.errors import DataError, JaxlmError, UsageError

PRETRAINED_ENCODER = "all-minilm-l6-v2"
# Text view name -> how many positive examples follow the definition.
TEXT_VIEWS: dict[str, int] = {"definition": 0, "definition+examples": 2}
DEFAULT_RATE_CAP = 100  # Super-NI trains on at most 100 instances per task


class Embedder(Protocol):
    """Anything that maps texts to (N, D) unit vectors (SentenceEmbedder, CachedEmbedder)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def instruction_view(task: TaskData, text: str = "definition") -> str:
    """The text of `task` that is embedded: its definition, or definition + positive examples."""
    if text not in TEXT_VIEWS:
        raise UsageError(f"--text {text!r} is not a known instruction view; known: {sorted(TEXT_VIEWS)}")
    return instruction_text(task, with_examples=TEXT_VIEWS[text])


def rank_sources(
    target: TaskData, sources: Mapping[str, TaskData], *, embedder: Embedder, text: str = "definition"
) -> list[tuple[str, float]]:
    """[(source name, cosine similarity)] over every source but the target, most similar first.

    Ties break by name, so a ranking is reproducible whatever the order of `sources`.
    """
    names = [name for name in sources if name != target.name]
    if not names:
        return []
    texts = [instruction_view(target, text)] + [instruction_view(sources[n], text) for n in names]
    emb_NxD = np.asarray(embedder.embed(texts), np.float32)
    emb_NxD = emb_NxD / np.maximum(np.linalg.norm(emb_NxD, axis=-1, keepdims=True), 1e-12)
    scores_S = emb_NxD[1:] @ emb_NxD[0]
    order = sorted(range(len(names)), key=lambda i: (-scores_S[i], names[i]))
    return [(names[i], float(scores_S[i])) for i in order]


def select_top_k(
    target: TaskData, sources: Mapping[str, TaskData], *, embedder: Embedder, k: int, text: str = "definition"
) -> list[str]:
    """Names of the `k` source tasks whose instructions are most similar to the target's."""
    if k < 1:
        raise UsageError(f"--top_k must be at least 1, got {k}")
    return [name for name, _ in rank_sources(target, sources, embedder=embedder, text=text)[:k]]


def selection_mixture_rates(
    selected: Iterable[str], sources: Mapping[str, TaskData], cap: int = DEFAULT_RATE_CAP
) -> dict[str, float]:
    """{task name: rate} for a seqio Mixture of the selected tasks: examples-proportional, capped
    at `cap` instances so a large task cannot drown the others (T5's capped proportional mixing)."""
    if cap < 1:
        raise UsageError(f"mixture rate cap must be at least 1, got {cap}")
    rates: dict[str, float] = {}
    for name in selected:
        if name not in sources:
            raise DataError(f"selected task {name!r} is not among the {len(sources)} source tasks")
        if not sources[name].instances:
            raise DataError(f"selected task {name!r} has no instances to train on")
        rates[name] = float(min(len(sources[name].instances), cap))
    return rates


def instruction_groups(tasks: Mapping[str, TaskData], by: str = "task") -> list[list[str]]:
    """Positive groups for aligned-encoder tuning (`jaxlm.train.embedder_tuning.tune_embedder`).

    by="task": the views of one task's instruction (definition; with 1; with 2 positive examples);
    by="category": the definitions of the tasks sharing a category. Groups of one text are dropped.
    """
    if by == "task":
        groups = [list(dict.fromkeys(instruction_text(t, with_examples=n) for n in range(3))) for t in tasks.values()]
    elif by == "category":
        members: dict[str, list[str]] = {}
        for task in tasks.values():
            for category in task.categories:
                members.setdefault(category, []).append(instruction_view(task, "definition"))
        groups = [list(dict.fromkeys(texts)) for _, texts in sorted(members.items())]
    else:
        raise UsageError(f"instruction groups by {by!r}: expected 'task' or 'category'")
    return [g for g in groups if len(g) >= 2]


def near_names(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Known task names that look like `name` (typos, or the name without its `taskNNN_` prefix)."""
    known = sorted(known)
    contains = [k for k in known if name.lower() in k.lower()]
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    return list(dict.fromkeys(contains[:n] + close))[:n]


def find_task(name: str, tasks: Mapping[str, TaskData], flag: str = "--target") -> TaskData:
    """`tasks[name]` (also accepting `source:name`), or a DataError naming the flag and near names."""
    key = name.split(":", 1)[1] if ":" in name and name.split(":", 1)[1] in tasks else name
    if key in tasks:
        return tasks[key]
    hint = near_names(key, tasks)
    suggestion = f"; did you mean: {', '.join(hint)}" if hint else ""
    raise DataError(f"{flag} {name!r}: no such task among the {len(tasks)} tasks found{suggestion}")


def load_encoder(encoder: str | None = None, cache_dir: str | Path | None = None) -> CachedEmbedder:
    """The sentence encoder for `--encoder`, behind the embedding cache: None is pretrained
    all-MiniLM-L6-v2 (loaded only on a cache miss), else an aligned checkpoint directory
    (`export_hf` of `jaxlm.train.embedder_tuning.tune_embedder`'s result)."""
    if encoder is None:
        return CachedEmbedder(None, cache_dir=cache_dir, model_id=PRETRAINED_ENCODER)
    from jaxlm.checkpoints.pretrained import load_pretrained
    from jaxlm.models.embedder import SentenceEmbedder

    try:
        pretrained = load_pretrained(encoder)
    except JaxlmError as e:  # CheckpointError (missing package, bad directory): name the flag
        raise UsageError(f"--encoder {encoder}: {e}") from None
    if pretrained.family != "bert":
        raise UsageError(f"--encoder {encoder}: a sentence encoder must be a BERT checkpoint, got family {pretrained.family!r}")
    return CachedEmbedder(SentenceEmbedder(pretrained), cache_dir=cache_dir, model_id=encoder_id(encoder))


def encoder_id(encoder: str) -> str:
    """Cache key of an encoder: its package name, or a content hash of a checkpoint's weights (so a
    re-tuned encoder written to the same directory never reuses stale embeddings)."""
    weights = Path(encoder) / "model.safetensors"
    if not weights.is_file():
        return encoder.lower()
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return f"aligned-{digest.hexdigest()[:16]}"
