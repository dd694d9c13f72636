"""BIG-bench JSON tasks and BIG-Bench Hard files -> TaskData.

BIG-bench (`bigbench/benchmark_tasks/` layout): a leaf task is `<task>/task.json` (name `task`) or
`<task>/<subtask>/task.json` (name `task/subtask`); a task.json that itself lists inline "subtasks"
(objects with a "name") yields one task per entry, `task/<name>`, each inheriting the parent's fields
it does not set (none of the 1001 shared files does this; the format allows it).
  definition   `task_prefix` when non-empty (it is the instruction the model actually reads, e.g.
               Natural Instructions v1 subtasks), else `description` (a one-line task summary). Stripped.
  categories   `keywords`.
  metadata     every top-level field except `examples`, verbatim, plus json_task's defaults for the
               prompt fields a file leaves out (`task_prefix` "", `example_input_prefix` "\\nQ: ",
               `example_output_prefix` "\\nA: ", `choice_prefix` "\\n  choice: ",
               `append_choices_to_input` True), `path`, `skipped_empty`, and `generative_targets`
               (instance id -> `target` list, only where an example's `target` differs from its best
               `target_scores` options, e.g. strategyqa's explained answers).
  instances    id `"{task}-{index}"` (index in the file's `examples`), the raw `input` (prompt assembly
               with prefixes and choices is `jaxlm.data.prompts`' job). With `target_scores`: multiple
               choice, `options` = its keys in file order, `option_scores` = its values, `outputs` = the
               max-score option(s). Otherwise generative: `outputs` = `target` (a string or a list).
  skipped      examples with neither input nor options, or no non-empty reference (counted). A
               multiple-choice example with an empty input is kept: its options carry the question
               (cause_and_effect, misconceptions_russian).

BBH (`bbh/<task>.json`, `{"examples": [{"input", "target"}]}`): answer options are parsed from the input:
  lettered   "Options:\\n(A) ...\\n(B) ..." -> options ("(A)", "(B)", ...) (BBH targets are the letters);
             the option texts go to `metadata["option_texts"][id]`.
  listed     "Options:\\n- Yes\\n- No" (causal_judgement, navigate; formal_fallacies' valid/invalid)
             -> options ("Yes", "No").
  implied    no Options block but a closed answer set fixed by the task: boolean_expressions True/False,
             sports_understanding yes/no, web_of_lies Yes/No.
  none       generative (dyck_languages, multistep_arithmetic_two, object_counting, word_sorting).
An instance whose target is not among its parsed options (three BBH inputs split an option at a comma,
e.g. "Monsters, Inc") stays generative and is listed in `metadata["target_not_in_options"]`.
BBH definitions: the one-line task description that opens each task's few-shot prompt file in the
BBH repository (`cot-prompts/<task>.txt`), quoted in `BBH_DESCRIPTIONS`; "" for an unknown task.
The BBH inputs already list their options, so `append_choices_to_input` is False and the prompt fields
give BBH's "Q: {input}\\nA: " form.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlm.data.schema import Instance, TaskData
from jaxlm.data.task_files import (
    bad_field,
    cached_by_mtime,
    expect_str,
    read_json,
    select_names,
    source_dir,
)
from jaxlm.errors import DataError

# json_task's defaults for the prompt fields (bigbench/api/json_task.py).
PROMPT_DEFAULTS: dict[str, Any] = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}
NON_ENGLISH_KEYWORD = "non-English"

# First line after the canary of BBH's cot-prompts/<task>.txt (suzgunmirac/BIG-Bench-Hard).
BBH_DESCRIPTIONS: dict[str, str] = {
    "boolean_expressions": "Evaluate the result of a random Boolean expression.",
    "causal_judgement": "Answer questions about causal attribution.",
    "date_understanding": "Infer the date from context.",
    "disambiguation_qa": "Clarify the meaning of sentences with ambiguous pronouns.",
    "dyck_languages": "Correctly close a Dyck-n word.",
    "formal_fallacies": "Distinguish deductively valid arguments from formal fallacies.",
    "geometric_shapes": "Name geometric shapes from their SVG paths.",
    "hyperbaton": "Order adjectives correctly in English sentences.",
    "logical_deduction_five_objects": "A logical deduction task which requires deducing the order of a sequence of objects.",
    "logical_deduction_seven_objects": "A logical deduction task which requires deducing the order of a sequence of objects.",
    "logical_deduction_three_objects": "A logical deduction task which requires deducing the order of a sequence of objects.",
    "movie_recommendation": "Recommend movies similar to the given list of movies.",
    "multistep_arithmetic_two": "Solve multi-step arithmetic problems.",
    "navigate": "Given a series of navigation instructions, determine whether one would end up back at the starting point.",
    "object_counting": "Questions that involve enumerating objects and asking the model to count them.",
    "penguins_in_a_table": "Answer questions about a table of penguins and their attributes.",
    "reasoning_about_colored_objects": "Answer extremely simple questions about the colors of objects on a surface.",
    "ruin_names": "Select the humorous edit that 'ruins' the input movie or musical artist name.",
    "salient_translation_error_detection": "Detect the type of error in an English translation of a German source sentence.",
    "snarks": "Determine which of two sentences is sarcastic.",
    "sports_understanding": "Determine whether an artificially constructed sentence relating to sports is plausible or not.",
    "temporal_sequences": "Answer questions about which times certain events could have occurred.",
    "tracking_shuffled_objects_five_objects": "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps.",
    "tracking_shuffled_objects_seven_objects": "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps.",
    "tracking_shuffled_objects_three_objects": "A task requiring determining the final positions of a set of objects given their initial positions and a description of a sequence of swaps.",
    "web_of_lies": "Evaluate a random boolean function expressed as a word problem.",
    "word_sorting": "Sort a list of words.",
}
# Closed answer sets of the BBH tasks whose inputs list no options.
BBH_IMPLIED_OPTIONS: dict[str, tuple[str, ...]] = {
    "boolean_expressions": ("True", "False"),
    "sports_understanding": ("yes", "no"),
    "web_of_lies": ("Yes", "No"),
}
BBH_PROMPT = {"task_prefix": "", "example_input_prefix": "Q: ", "example_output_prefix": "\nA: ",
              "choice_prefix": "\n  choice: ", "append_choices_to_input": False}

_LETTERED = re.compile(r"^\(([A-Z])\)\s?(.*)$")
_LISTED = re.compile(r"^-\s(.*)$")


# ----------------------------------------------------------------------------- BIG-bench

def _looks_like_bigbench(path: Path) -> bool:
    return any(path.glob("*/task.json")) or any(path.glob("*/*/task.json"))


def bigbench_dir(data_dir: str | os.PathLike | None) -> Path:
    return source_dir(data_dir, "bigbench", _looks_like_bigbench)


def leaf_task_files(data_dir: str | os.PathLike | None) -> dict[str, Path]:
    """Task name (`task` or `task/subtask`) -> task.json, by name."""
    root = bigbench_dir(data_dir)
    files = {p.parent.name: p for p in root.glob("*/task.json")}
    files.update({f"{p.parent.parent.name}/{p.parent.name}": p for p in root.glob("*/*/task.json")})
    return dict(sorted(files.items()))


def _targets(path: Path, value: Any, i: int) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad_field(path, ("examples", i, "target"), "must be a string or a list of strings")


def _scores(path: Path, value: Any, i: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    ok = isinstance(value, dict) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values())
    if not ok:
        raise bad_field(path, ("examples", i, "target_scores"), "must be a non-empty object of option -> number")
    return tuple(value), tuple(float(v) for v in value.values())


def _bigbench_task(path: Path, name: str, data: dict) -> TaskData:
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise bad_field(path, ("examples",), "must be a list of examples" if "examples" in data else "is missing")
    instances, skipped, generative_targets = [], 0, {}
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise bad_field(path, ("examples", i), "must be an object with input and target/target_scores")
        text = expect_str(path, ex.get("input"), "examples", i, "input")
        if "target" not in ex and "target_scores" not in ex:
            raise bad_field(path, ("examples", i), "needs a \"target\" or \"target_scores\"")
        id_ = f"{name}-{i}"
        targets = _targets(path, ex["target"], i) if "target" in ex else ()
        options, scores = _scores(path, ex["target_scores"], i) if "target_scores" in ex else ((), ())
        if options:
            best = max(scores)
            outputs = tuple(o for o, s in zip(options, scores) if s == best)
            if targets and set(targets) != set(outputs):
                generative_targets[id_] = targets
        else:
            outputs = targets
        if (not text.strip() and not options) or not any(o.strip() for o in outputs):
            skipped += 1
            continue
        instances.append(Instance(id=id_, input=text, outputs=outputs, options=options, option_scores=scores))
    for key in ("description", "task_prefix"):
        if key in data and not isinstance(data[key], str):
            raise bad_field(path, (key,), "must be a string")
    keywords = data.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise bad_field(path, ("keywords",), "must be a list of strings")
    metadata = {**PROMPT_DEFAULTS, **{k: v for k, v in data.items() if k not in ("examples", "subtasks")},
                "path": str(path), "skipped_empty": skipped}
    if generative_targets:
        metadata["generative_targets"] = generative_targets
    prefix = str(metadata["task_prefix"])
    definition = (prefix if prefix.strip() else str(data.get("description", ""))).strip()
    return TaskData(name=name, source="bigbench", definition=definition, instances=tuple(instances),
                    categories=tuple(keywords), metadata=metadata)


def _parse_bigbench_file(path: Path, name: str) -> tuple[TaskData, ...]:
    """One task.json -> its task, or one task per inline subtask (plus the parent if it has examples)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (a BIG-bench task), got {type(data).__name__}")
    subtasks = data.get("subtasks")
    if subtasks is None:
        return (_bigbench_task(path, name, data),)
    if not isinstance(subtasks, list):
        raise bad_field(path, ("subtasks",), "must be a list of subtask objects")
    parent = {k: v for k, v in data.items() if k not in ("subtasks", "examples")}
    tasks = [_bigbench_task(path, name, data)] if "examples" in data else []
    for j, sub in enumerate(subtasks):
        if not isinstance(sub, dict):
            raise bad_field(path, ("subtasks", j), "must be an object with a name and examples")
        sub_name = expect_str(path, sub.get("name"), "subtasks", j, "name")
        tasks.append(_bigbench_task(path, f"{name}/{sub_name}", {**parent, **sub}))
    return tuple(tasks)


read_bigbench_file = cached_by_mtime(_parse_bigbench_file)
read_bigbench_file.__doc__ = "Parse one BIG-bench task.json under the given task name (cached per file)."


def read_task(path: str | os.PathLike, name: str | None = None) -> TaskData:
    """The one task of a BIG-bench task.json (name defaults to its folder); see `read_bigbench_file`
    for files with inline subtasks."""
    tasks = read_bigbench_file(path, name or Path(path).parent.name)
    if len(tasks) != 1:
        raise DataError(f"{path}: holds {len(tasks)} subtasks; read it with read_bigbench_file")
    return tasks[0]


def load_bigbench(data_dir: str | os.PathLike | None, *, names: Sequence[str] | None = None) -> list[TaskData]:
    """Every leaf task of the directory, by name; `names` keeps those tasks (a parent keeps its subtasks;
    a `task/subtask` name also finds an inline subtask of `task/task.json`)."""
    files = leaf_task_files(data_dir)
    if names is None:
        return [t for n, path in files.items() for t in read_bigbench_file(path, n)]
    wanted = set(names)
    parents = {w.rsplit("/", 1)[0] for w in wanted}
    tasks = [t for n, path in files.items() if n in wanted or n in parents or n.split("/", 1)[0] in wanted
             for t in read_bigbench_file(path, n)]
    tasks = [t for t in tasks if t.name in wanted or t.name.split("/", 1)[0] in wanted]
    select_names([t.name for t in tasks], names, "bigbench")  # raises on a name that matched nothing
    return tasks


def is_english(task: TaskData) -> bool:
    """BIG-bench marks tasks whose text is not English with the keyword "non-English"; BBH is English."""
    return NON_ENGLISH_KEYWORD not in task.categories


# ----------------------------------------------------------------------------- BBH

def _looks_like_bbh(path: Path) -> bool:
    return any(p.is_file() for p in path.glob("*.json"))


def bbh_dir(data_dir: str | os.PathLike | None) -> Path:
    return source_dir(data_dir, "bbh", _looks_like_bbh)


def parse_options(text: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The answer options an input lists after its last "Options:" line.

    Returns (style, options, option_texts): ("lettered", ("(A)", "(B)"), ("12/11/1937", ...)),
    ("listed", ("Yes", "No"), ("Yes", "No")), or ("none", (), ()) when no well-formed block ends the input.
    """
    _, sep, block = text.rpartition("Options:\n")
    if not sep:
        return "none", (), ()
    lines = [line.rstrip() for line in block.split("\n") if line.strip()]
    lettered = [_LETTERED.match(line) for line in lines]
    if lines and all(lettered):
        return "lettered", tuple(f"({m.group(1)})" for m in lettered), tuple(m.group(2).strip() for m in lettered)
    listed = [_LISTED.match(line) for line in lines]
    if lines and all(listed):
        texts = tuple(m.group(1).strip() for m in listed)
        return "listed", texts, texts
    return "none", (), ()


def _parse_bbh(path: Path) -> TaskData:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with \"examples\", got {type(data).__name__}")
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise bad_field(path, ("examples",), "must be a list of examples" if "examples" in data else "is missing")
    name = path.stem
    instances, skipped, styles = [], 0, Counter()
    option_texts: dict[str, tuple[str, ...]] = {}
    not_in_options: list[str] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise bad_field(path, ("examples", i), "must be an object with input and target")
        text = expect_str(path, ex.get("input"), "examples", i, "input")
        target = expect_str(path, ex.get("target"), "examples", i, "target")
        if not text.strip() or not target.strip():
            skipped += 1
            continue
        id_ = f"{name}-{i}"
        style, options, texts = parse_options(text)
        if style == "none" and name in BBH_IMPLIED_OPTIONS:
            style, options = "implied", BBH_IMPLIED_OPTIONS[name]
        if options and target not in options:
            not_in_options.append(id_)
            style, options = "none", ()
        styles[style] += 1
        if style == "lettered":
            option_texts[id_] = texts
        scores = tuple(1.0 if o == target else 0.0 for o in options)
        instances.append(Instance(id=id_, input=text, outputs=(target,), options=options, option_scores=scores))
    metadata: dict[str, Any] = {**BBH_PROMPT, **{k: v for k, v in data.items() if k != "examples"},
                                "path": str(path), "skipped_empty": skipped,
                                "options_style": styles.most_common(1)[0][0] if styles else "none",
                                "target_not_in_options": not_in_options}
    if option_texts:
        metadata["option_texts"] = option_texts
    return TaskData(name=name, source="bbh", definition=BBH_DESCRIPTIONS.get(name, ""),
                    instances=tuple(instances), metadata=metadata)


read_bbh_task = cached_by_mtime(_parse_bbh)
read_bbh_task.__doc__ = "Parse one BBH task file (cached per path, mtime and size); DataError names file+field."


def load_bbh(data_dir: str | os.PathLike | None, *, names: Sequence[str] | None = None) -> list[TaskData]:
    """Every `<task>.json` of the BBH directory, by name."""
    files = {p.stem: p for p in sorted(bbh_dir(data_dir).glob("*.json"))}
    chosen = select_names(list(files), names, "bbh") if names is not None else list(files)
    return [read_bbh_task(files[n]) for n in chosen]
