"""ICIL: one fixed prompt of cross-task demonstrations, used unchanged for every evaluation task.

Demonstrations come only from training tasks whose answer choices are spelled out in their
definition (the first answers of the task must appear in the definition), one demonstration per
task of at most `max_demo_tokens` tokens, no two tasks sharing an answer label, K tasks, chosen
by a seeded shuffle. The set is saved as JSON so a whole sweep (every model, every task) reads the
same prompt. A published demonstration file (the ICIL paper's `ICIL_seed{1..10}.json`:
{"demo": [K strings, each "Definition: {def}\n\nInput: {x}\nOutput: {y}"]}) is read by
`published_demo_set`; its strings are used verbatim.

Prompt (joined by blank lines "\\n\\n"):
  demo:   "Definition: {def}\\n\\nInput: {x}\\nOutput: {y}"
  target: "Definition: {def}\\n\\nInput: {x}\\nOutput: "
Fields are `.strip()`ped; no punctuation is added (unlike the Tk-Instruct formats). Trailing demos
are dropped until the prompt fits the token budget; predictions are cut at the first blank line,
since a model that continues the pattern starts a new "Definition:" after one.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from jaxlm.data.schema import Instance, TaskData
from jaxlm.errors import DataError, UsageError
from jaxlm.files import write_atomically

FIRST_ANSWERS = 10  # how many leading instances' answers must appear in the definition


@dataclass
class ICILDemoSet:
    """K demonstrations {"task", "definition", "input", "output"} and how they were chosen."""

    seed: int
    k: int
    tasks: list[str]
    demos: list[dict[str, str]]
    max_demo_tokens: int = 256
    labels: dict[str, list[str]] = field(default_factory=dict)  # task -> its answer label set

    def demo_strings(self) -> list[str]:
        """Each demo's block: its published "text" when it has one, else `demo_text` of its fields."""
        return [d["text"] if "text" in d else demo_text(d["definition"], d["input"], d["output"]) for d in self.demos]

    def to_json(self, path: str | Path) -> Path:
        """Write atomically, so a reader never sees half a file."""
        return write_atomically(path, lambda f: json.dump(asdict(self), f, ensure_ascii=False, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> ICILDemoSet:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read ICIL demo set ({e})") from e
        missing = [k for k in ("seed", "k", "tasks", "demos") if k not in raw]
        if missing:
            raise DataError(f"{path}: ICIL demo set lacks field(s) {missing}")
        for i, d in enumerate(raw["demos"]):
            lacking = [k for k in ("task", "definition", "input", "output") if k not in d]
            if lacking:
                raise DataError(f"{path}: demos[{i}] lacks field(s) {lacking}")
        return cls(**{k: raw[k] for k in ("seed", "k", "tasks", "demos", "max_demo_tokens", "labels") if k in raw})


def published_demo_set(path: str | Path, *, seed: int, k: int | None = None) -> ICILDemoSet:
    """A published ICIL demonstration file as an ICILDemoSet (its strings kept verbatim).

    Args:
      path: a JSON file {"demo": [str, ...]}, each string "Definition: ...\n\nInput: ...\nOutput: ...".
      seed: the seed it is recorded under (the file's own, e.g. 1 for ICIL_seed1.json).
      k: use the first k demonstrations (default: all).

    Returns:
      ICILDemoSet with k demos {"task": "<file name>#<index>", "definition", "input", "output" (parsed
      from the string), "text" (the string itself)}.

    Raises:
      DataError: the file is unreadable, not {"demo": [strings]}, a string is not in the demo format,
        or it holds fewer than k demonstrations.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the ICIL demonstration file ({e})") from None
    strings = raw.get("demo") if isinstance(raw, dict) else None
    if not isinstance(strings, list) or not strings or not all(isinstance(x, str) for x in strings):
        raise DataError(f"{path}: expected {{\"demo\": [demonstration strings]}}")
    if k is not None and not 1 <= k <= len(strings):
        raise DataError(f"{path}: holds {len(strings)} demonstrations, k={k} asked")
    demos = []
    for i, text in enumerate(strings[:k]):
        match = _PUBLISHED.fullmatch(text)
        if match is None:
            raise DataError(f"{path}: demo[{i}] is not 'Definition: ...\\n\\nInput: ...\\nOutput: ...'")
        demos.append({"task": f"{path.name}#{i}", "definition": match["definition"], "input": match["input"],
                      "output": match["output"], "text": text})
    return ICILDemoSet(seed=seed, k=len(demos), tasks=[d["task"] for d in demos], demos=demos)


_PUBLISHED = re.compile(r"Definition: (?P<definition>.*?)\n\nInput: (?P<input>.*)\nOutput: (?P<output>.*)", re.DOTALL)


def demo_text(definition: str, text: str, output: str | None = None) -> str:
    """'Definition: {def}\\n\\nInput: {x}\\nOutput: {y}' (open 'Output: ' when `output` is None)."""
    tail = "" if output is None else output.strip()
    return f"Definition: {definition.strip()}\n\nInput: {text.strip()}\nOutput: {tail}"


def _norm(label: str) -> str:
    return " ".join(label.lower().split())


def first_answers(task: TaskData, first: int = FIRST_ANSWERS) -> set[str]:
    """The (normalised) first reference of each of the task's leading `first` instances."""
    return {_norm(inst.outputs[0]) for inst in task.instances[:first] if inst.outputs and inst.outputs[0].strip()}


def answer_labels(task: TaskData) -> set[str]:
    """The task's label set: the (normalised) first reference of every instance."""
    return first_answers(task, len(task.instances))


def in_definition(label: str, definition: str) -> bool:
    """`label` occurs in the definition as a whole word or phrase (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(_norm(label))}(?!\w)", _norm(definition)) is not None


def answers_in_definition(task: TaskData, first: int = FIRST_ANSWERS) -> bool:
    """ICIL's filter: the task's first answers all appear in its definition (answer choices are in the instruction)."""
    answers = first_answers(task, first)
    return bool(answers) and all(in_definition(a, task.definition) for a in answers)


def build_icil_demos(train_tasks: Mapping[str, TaskData], *, k: int = 8, seed: int = 0, max_demo_tokens: int = 256,
                     count_tokens: Callable[[str], int]) -> ICILDemoSet:
    """Choose K training tasks and one short demonstration each (see the module docstring).

    Tasks are visited in a seeded shuffle of their sorted names; a task is taken when the first
    answers of its first FIRST_ANSWERS instances appear in its definition, its label set (the first
    answer of every instance) is disjoint from every label already taken, and one of its instances
    (visited in a seeded shuffle) whose answer appears in the definition gives a demo of at most
    `max_demo_tokens` tokens. Fewer than `k` such tasks is a DataError (no silent short prompt).
    """
    if k < 1:
        raise UsageError(f"ICIL k must be >= 1, got {k}")
    rng = random.Random(seed)
    names = sorted(train_tasks)
    rng.shuffle(names)
    chosen: list[str] = []
    demos: list[dict[str, str]] = []
    label_sets: dict[str, list[str]] = {}
    taken: set[str] = set()
    for name in names:
        task = train_tasks[name]
        if not answers_in_definition(task):
            continue
        labels = answer_labels(task)
        if labels & taken:
            continue
        instance = _short_instance(task, rng, max_demo_tokens, count_tokens)
        if instance is None:
            continue
        chosen.append(name)
        taken |= labels
        label_sets[name] = sorted(labels)
        demos.append({"task": name, "definition": task.definition.strip(), "input": instance.input.strip(),
                      "output": instance.outputs[0].strip()})
        if len(chosen) == k:
            break
    if len(chosen) < k:
        raise DataError(f"only {len(chosen)} of the {len(train_tasks)} training tasks qualify as ICIL demonstrations "
                        f"(answers in the definition, disjoint labels, a demo of <= {max_demo_tokens} tokens); k={k}")
    return ICILDemoSet(seed=seed, k=k, tasks=chosen, demos=demos, max_demo_tokens=max_demo_tokens, labels=label_sets)


def _short_instance(task: TaskData, rng: random.Random, max_tokens: int,
                    count_tokens: Callable[[str], int]) -> Instance | None:
    """A seeded-random instance whose answer appears in the definition and whose demo fits `max_tokens`."""
    if count_tokens(demo_text(task.definition, "", "")) > max_tokens:
        return None  # the definition alone is over budget
    order = list(range(len(task.instances)))
    rng.shuffle(order)
    for i in order:
        inst = task.instances[i]
        if not inst.outputs or not in_definition(inst.outputs[0], task.definition):
            continue
        if count_tokens(demo_text(task.definition, inst.input, inst.outputs[0])) <= max_tokens:
            return inst
    return None


def icil_prompt(demos: ICILDemoSet, task: TaskData, instance: Instance, *, max_tokens: int,
                count_tokens: Callable[[str], int]) -> str:
    """The K demos then the target, blank-line separated; trailing demos dropped until it fits.

    When even the bare target is too long it is returned as is (the caller's truncation applies).
    """
    target = demo_text(task.definition, instance.input)
    blocks = demos.demo_strings()
    n = len(blocks)
    while n > 0 and count_tokens("\n\n".join(blocks[:n] + [target])) > max_tokens:
        n -= 1
    return "\n\n".join(blocks[:n] + [target])


def cut_at_blank_line(prediction: str) -> str:
    """The prediction up to its first blank line, stripped (the model's answer before a new demo)."""
    return re.split(r"\n[ \t]*\n", prediction.lstrip("\n"), maxsplit=1)[0].strip()
