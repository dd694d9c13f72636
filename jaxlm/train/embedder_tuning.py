"""The "aligned" instruction encoder of INSTA: all-MiniLM-L6-v2 fine-tuned so that instructions of
the same task (or category) embed close together and those of other tasks apart.

A pretrained sentence encoder has never seen the meta-dataset's instruction style, so every Super-NI
definition looks alike to it; a short contrastive fine-tuning on the training tasks' own instructions
spreads them out by what the task asks. Loss: symmetric InfoNCE with in-batch negatives and a
temperature, over pairs of texts from one group (two views of one task's instruction, or two tasks
of one category). Pure loss + one jitted optax AdamW step; the run is a function of its seed.
Save the tuned encoder with `jaxlm.checkpoints.pretrained.export_hf`: `load_pretrained(dir)` and
`jaxlm select --encoder DIR` then use it unchanged. No TensorFlow here: groups arrive as plain strings
(`jaxlm.data.selection.instruction_groups` builds them from tasks).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer as HFTokenizer

from jaxlm.buckets import bucket_length, pad_rows, powers_of_two
from jaxlm.checkpoints.pretrained import Pretrained, family
from jaxlm.errors import DataError, UsageError
from jaxlm.models.embedder import MIN_BUCKET, sentence_embedding
from jaxlm.train.optim import make_optimizer

Array = jax.Array


def info_nce_loss(anchor_BxD: Array, positive_BxD: Array, temperature: float) -> Array:
    """Symmetric InfoNCE: row i's positive is row i of the other side, every other row a negative.

    Inputs are unit vectors, so logits are cosines / temperature.
    """
    logits_BxB = (anchor_BxD @ positive_BxD.T) / temperature
    labels_B = jnp.arange(logits_BxB.shape[0])
    forward = optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels_B)
    backward = optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels_B)
    return 0.5 * (forward.mean() + backward.mean())


def contrastive_loss(model: Any, params: Any, ids_2BxL: Array, mask_2BxL: Array, temperature: float) -> Array:
    """InfoNCE of a batch whose first half are anchors and second half their positives (one forward)."""
    emb_2BxD = sentence_embedding(model, params, ids_2BxL, mask_2BxL)
    half = emb_2BxD.shape[0] // 2
    return info_nce_loss(emb_2BxD[:half], emb_2BxD[half:], temperature)


@functools.lru_cache(maxsize=8)
def train_step(
    family_name: str, config: Any, learning_rate: float, weight_decay: float, temperature: float
) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jit(params, opt_state, ids, mask) -> (params, opt_state, loss)), params and state donated.

    The project's AdamW (`make_optimizer`: decay on matrices only, global-norm clipping) at a constant
    rate with BERT's b2 = 0.999. Cached per (model config, hyperparameters), so repeated runs (seeds,
    resumed tuning) compile once.
    """
    model = family(family_name).module(config)
    optimizer = make_optimizer(
        "adamw", learning_rate=learning_rate, schedule="constant", weight_decay=weight_decay, b2=0.999
    )

    def step(params, opt_state, ids_2BxL, mask_2BxL):
        loss_fn = lambda p: contrastive_loss(model, p, ids_2BxL, mask_2BxL, temperature)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class TokenizedGroups:
    """Every text tokenized once and padded to one width (one compiled step shape for the whole run)."""

    ids_TxL: np.ndarray
    mask_TxL: np.ndarray
    groups: tuple[tuple[int, ...], ...]  # rows of each group's distinct token sequences (>= 2 each)


def tokenize_groups(pretrained: Pretrained, instruction_groups: Sequence[Sequence[str]], max_length: int) -> TokenizedGroups:
    """Tokenize every text once, truncated to `max_length`, and keep the groups that still hold two
    different token sequences (views that differ only past `max_length` would be trivial positives)."""
    if pretrained.family != "bert" or pretrained.tokenizer is None:
        raise UsageError(f"{pretrained.source}: embedder tuning needs a BERT checkpoint with a tokenizer.json")
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    cap = min(max_length, pretrained.config.max_position_embeddings)
    backend = HFTokenizer.from_str(pretrained.tokenizer.backend.to_str())  # private copy: truncation is stateful
    backend.enable_truncation(cap)
    texts = list(dict.fromkeys(t for group in instruction_groups for t in group))
    row_of: dict[tuple[int, ...], int] = {}  # token sequence -> row
    text_row = {t: row_of.setdefault(tuple(e.ids), len(row_of)) for t, e in zip(texts, backend.encode_batch(texts))}
    groups = tuple(g for g in (tuple(dict.fromkeys(text_row[t] for t in group)) for group in instruction_groups) if len(g) >= 2)
    if not groups:
        raise DataError(
            f"no instruction group has two texts that differ within max_length={max_length} tokens "
            f"({len(instruction_groups)} groups given)"
        )
    rows = [list(ids) for ids in row_of]
    width = bucket_length(max(len(r) for r in rows), powers_of_two(cap, MIN_BUCKET))
    pad_id = pretrained.tokenizer.pad_id if pretrained.tokenizer.pad_id is not None else 0
    ids, mask = pad_rows(rows, width, pad_id)
    return TokenizedGroups(ids, mask, groups)


def sample_pairs(rng: np.random.Generator, groups: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """(2B,) text rows: B distinct groups, two distinct texts of each (anchors first, then positives)."""
    chosen = rng.choice(len(groups), size=batch_size, replace=False)
    pairs = np.array([rng.choice(groups[g], size=2, replace=False) for g in chosen])
    return np.concatenate([pairs[:, 0], pairs[:, 1]])


def tune_embedder(
    pretrained: Pretrained,
    instruction_groups: Sequence[Sequence[str]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float = 2e-5,
    temperature: float = 0.05,
    seed: int = 0,
    max_length: int = 128,
    weight_decay: float = 0.01,
) -> tuple[Pretrained, list[float]]:
    """Fine-tune a BERT sentence encoder contrastively on instruction groups.

    Each step draws `batch_size` different groups and two texts of each (seeded numpy generator);
    the other groups' texts are the negatives. Returns the tuned encoder (the input is untouched)
    and the loss of every step.
    """
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if temperature <= 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    data = tokenize_groups(pretrained, instruction_groups, max_length)
    if not 2 <= batch_size <= len(data.groups):
        raise UsageError(f"batch_size must be between 2 and the number of groups ({len(data.groups)}), got {batch_size}")
    optimizer, step = train_step(pretrained.family, pretrained.config, learning_rate, weight_decay, temperature)
    params = jax.tree_util.tree_map(jnp.array, pretrained.params)  # a copy: the step donates its input
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        rows = sample_pairs(rng, data.groups, batch_size)
        params, opt_state, loss = step(params, opt_state, data.ids_TxL[rows], data.mask_TxL[rows])
        losses.append(float(loss))
    return dataclasses.replace(pretrained, params=params, source=f"{pretrained.source} (instruction-aligned)"), losses


def group_loss(pretrained: Pretrained, instruction_groups: Sequence[Sequence[str]], *, temperature: float, max_length: int) -> float:
    """InfoNCE of one fixed batch (first two texts of every group): a before/after yardstick."""
    data = tokenize_groups(pretrained, instruction_groups, max_length)
    rows = np.array([g[0] for g in data.groups] + [g[1] for g in data.groups])
    loss = _jitted_loss(pretrained.family, pretrained.config, temperature)
    return float(loss(pretrained.params, data.ids_TxL[rows], data.mask_TxL[rows]))


@functools.lru_cache(maxsize=8)
def _jitted_loss(family_name: str, config: Any, temperature: float) -> Callable:
    model = family(family_name).module(config)
    return jax.jit(lambda params, ids, mask: contrastive_loss(model, params, ids, mask, temperature))


def align_encoder(data_dir: str | Path, output_dir: str | Path, *, source: str = "superni", split: str = "default",
                  group_by: str = "task", steps: int = 200, batch_size: int = 16, learning_rate: float = 2e-5,
                  temperature: float = 0.05, seed: int = 0, max_length: int = 64) -> dict[str, Any]:
    """Tune the aligned INSTA encoder on the training tasks' instructions and export it as a HF dir.

    Args:
      data_dir: the source's data directory.
      output_dir: where the tuned all-MiniLM-L6-v2 is written (`load_pretrained(output_dir)` reads it;
        `jaxlm select --encoder output_dir` uses it).
      source: "superni" (its `split`'s training tasks) or a source without splits (all its tasks).
      group_by: "task" (views of one instruction are positives) or "category".
      steps, batch_size, learning_rate, temperature, seed, max_length: see `tune_embedder`.

    Returns:
      {"output_dir", "groups", "steps", "first_loss", "last_loss"} (losses rounded to 1e-6).

    Raises:
      DataError: fewer than 2 instruction groups; UsageError: an unknown `group_by`.
    """
    from jaxlm.checkpoints.pretrained import export_hf, load_pretrained
    from jaxlm.data.selection import PRETRAINED_ENCODER, instruction_groups
    from jaxlm.data.sources import load_tasks

    part = "train" if source == "superni" else None
    tasks = load_tasks(source, data_dir, split=(split or "default") if part else None, part=part)
    groups = instruction_groups(tasks, by=group_by)
    if len(groups) < 2:
        raise DataError(f"--data_dir {data_dir}: {len(groups)} instruction group(s) by {group_by}; need at least 2")
    tuned, losses = tune_embedder(
        load_pretrained(PRETRAINED_ENCODER), groups, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, temperature=temperature, seed=seed, max_length=max_length,
    )
    path = export_hf(tuned, output_dir)
    return {"output_dir": str(path), "groups": len(groups), "steps": len(losses),
            "first_loss": round(losses[0], 6), "last_loss": round(losses[-1], 6)}
