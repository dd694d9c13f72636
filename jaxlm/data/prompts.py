"""Prompt formats: the exact string a model receives for one task instance, before tokenization.

One builder for the whole project (seqio tasks, `jaxlm data show`, sweeps, INSTA), so a format is
defined once and every study that names it sees the same text.

Formats
  def          Tk-Instruct definition only: "Definition: {def}\\n\\n" + the Tk query.
  def_pos2     Tk-Instruct "definition + 2 positive examples" (allenai/tk-instruct `src/ni_collator.py`,
               add_task_name=False, add_task_definition=True, num_pos_examples=2, num_neg_examples=0,
               add_explanation=False). The Tk query is
               "Now complete the following example -\\nInput: {x}.\\nOutput: ".
               Every "." above is added only when the text before it does not already end in
               `string.punctuation`; definition, inputs and outputs are `.strip()`ped first.
  none         the instance input alone.
  query        the Tk query alone, "Now complete the following example -\\nInput: {x}.\\nOutput: ": no
               instruction, what a TAGI hypernetwork's student reads (student_format "query").
  instruction  the instruction alone (`instruction_text(task)`), whatever the instance.
  fewshot      k in-task demonstrations then the input, no definition:
               "Input: {x1}\\nOutput: {y1}\\n\\n...Input: {x}\\nOutput: ".
  bigbench     BIG-bench's zero-shot JSON-task format (`bigbench/api/json_task.py`):
               task_prefix + example_input_prefix + input
               [+ choice_prefix + choice_prefix.join(options) when append_choices_to_input]
               + example_output_prefix. Nothing is stripped: json_task's `default_format_fn` appends
               the output prefix verbatim, so the default prompt ends in "\\nA: " (trailing space kept).
               Missing metadata takes json_task's defaults (input "\\nQ: ", output "\\nA: ",
               choice "\\n  choice: ", append True). Choices keep the task file's order (BIG-bench shuffles
               them with a task-wide RandomState(42) stream, which no per-instance builder can replay).

Over-long prompts: `truncate_to_tokens` is Tk-Instruct's rule (keep the first max_source_length tokens,
decoded back to text); `def_pos2` also drops positive examples that would overflow when given
`count_tokens`, as the collator does.
"""

from __future__ import annotations

import string
from typing import Callable, Sequence

from jaxlm.data.schema import Demo, Instance, TaskData
from jaxlm.errors import UsageError

FORMATS = ("def", "def_pos2", "none", "query", "instruction", "fewshot", "bigbench")

MAX_SOURCE_LENGTH = 1024  # Tk-Instruct's source budget (tokens)

# BIG-bench json_task defaults for fields a task file leaves out.
BIGBENCH_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def _end_punct(text: str) -> str:
    """Tk-Instruct's rule: add "." unless the text already ends in ASCII punctuation."""
    return text if text and text[-1] in string.punctuation else text + "."


# ----------------------------------------------------------------------------- Tk-Instruct pieces

def tk_definition(definition: str) -> str:
    """'Definition: {def}' (+ '.') + blank line, as the collator builds it."""
    return _end_punct("Definition: " + definition.strip()) + "\n\n"


def tk_query(text: str) -> str:
    """The instance part of every Tk prompt: 'Now complete the following example -\\nInput: {x}.\\nOutput: '."""
    return _end_punct("Now complete the following example -\nInput: " + text.strip()) + "\nOutput: "


def tk_positive_example(index: int, demo: Demo) -> str:
    """' Positive Example {i} -\\nInput: {x}.\\n Output: {y}.\\n\\n' (index from 1; leading spaces are the collator's)."""
    s = _end_punct(f" Positive Example {index} -\nInput: {demo.input.strip()}") + "\n"
    return _end_punct(s + f" Output: {demo.output.strip()}") + "\n\n"


def _tk_examples(definition: str, demos: Sequence[Demo], query: str,
                 count_tokens: Callable[[str], int] | None, max_source_length: int) -> list[str]:
    """Positive-example strings the collator keeps: each is added only if the prompt still fits.

    The collator measures `definition + " ".join(kept) + candidate + query` (a space join, although
    the prompt itself joins with ""); reproduced so the same examples are kept.
    """
    kept: list[str] = []
    for i, demo in enumerate(demos, start=1):
        candidate = tk_positive_example(i, demo)
        if count_tokens is not None and count_tokens(definition + " ".join(kept) + candidate + query) > max_source_length:
            break
        kept.append(candidate)
    return kept


# ----------------------------------------------------------------------------- public API

def instruction_text(task: TaskData, *, with_examples: int = 0) -> str:
    """The task's instruction as a hypernetwork reads it and INSTA embeds it.

    The instruction part of the Tk prompt: 'Definition: {def}.' then the first `with_examples`
    positive examples in Tk form, surrounding whitespace stripped (no instance, no query).
    """
    if with_examples < 0:
        raise UsageError(f"with_examples must be >= 0, got {with_examples}")
    examples = "".join(tk_positive_example(i, d) for i, d in enumerate(task.positive_examples[:with_examples], start=1))
    return (tk_definition(task.definition) + examples).strip()


def demo_block(text: str, output: str | None = None) -> str:
    """'Input: {x}\\nOutput: {y}' (or the open 'Input: {x}\\nOutput: ' when `output` is None), stripped fields."""
    return f"Input: {text.strip()}\nOutput: " + ("" if output is None else output.strip())


def format_prompt(task: TaskData, instance: Instance, fmt: str, *, num_shots: int = 2,
                  demos: Sequence[Demo] | None = None, count_tokens: Callable[[str], int] | None = None,
                  max_source_length: int = MAX_SOURCE_LENGTH) -> str:
    """The model input for `instance` in format `fmt` (see the module docstring for each format).

    num_shots: positive examples (def_pos2) or demonstrations (fewshot); `demos` replaces the
    task's positive examples as their pool. count_tokens: when given, def_pos2 drops examples that
    would push the prompt past `max_source_length`, as Tk-Instruct's collator does.
    """
    if fmt not in FORMATS:
        raise UsageError(f"prompt format {fmt!r} is unknown; known: {', '.join(FORMATS)}")
    if num_shots < 0:
        raise UsageError(f"--num_shots must be >= 0, got {num_shots}")
    pool = tuple(task.positive_examples if demos is None else demos)[:num_shots]
    if fmt == "def":
        return tk_definition(task.definition) + tk_query(instance.input)
    if fmt == "def_pos2":
        definition, query = tk_definition(task.definition), tk_query(instance.input)
        return definition + "".join(_tk_examples(definition, pool, query, count_tokens, max_source_length)) + query
    if fmt == "none":
        return instance.input.strip()
    if fmt == "query":
        return tk_query(instance.input)
    if fmt == "instruction":
        return instruction_text(task)
    if fmt == "fewshot":
        return "\n\n".join([demo_block(d.input, d.output) for d in pool] + [demo_block(instance.input)])
    return bigbench_prompt(task, instance)


def bigbench_prompt(task: TaskData, instance: Instance) -> str:
    """BIG-bench's zero-shot JSON-task prompt (task_prefix + input prefix + input [+ choices] + output prefix)."""
    meta = {**BIGBENCH_DEFAULTS, **{k: v for k, v in task.metadata.items() if k in BIGBENCH_DEFAULTS and v is not None}}
    text = str(meta["example_input_prefix"]) + instance.input
    if instance.options and meta["append_choices_to_input"]:
        choice_prefix = str(meta["choice_prefix"])
        text += choice_prefix + choice_prefix.join(instance.options)
    return str(meta["task_prefix"]) + text + str(meta["example_output_prefix"])


def fits_tokens(text: str, max_tokens: int, tokenize: Callable[[str], list[int]]) -> bool:
    """Whether `text` tokenizes to at most `max_tokens` ids."""
    return len(tokenize(text)) <= max_tokens


def truncate_to_tokens(text: str, *, tokenize: Callable[[str], list[int]], detokenize: Callable[[list[int]], str],
                       max_source_length: int = MAX_SOURCE_LENGTH) -> str:
    """Tk-Instruct's rule: a prompt longer than `max_source_length` tokens keeps its first
    `max_source_length` tokens, decoded back to text (`tokenizer.decode(ids[:max], skip_special_tokens=True)`).

    With a jaxlm `Tokenizer`: `tokenize=tok.encode, detokenize=tok.decode`.
    """
    ids = tokenize(text)
    if len(ids) <= max_source_length:
        return text
    return detokenize(list(ids[:max_source_length]))
