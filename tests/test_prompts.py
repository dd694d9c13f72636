"""Prompt formats on real Super-NI and BIG-bench tasks; def_pos2 against an independent re-implementation
of Tk-Instruct's collator (allenai/tk-instruct src/ni_collator.py, default settings)."""

from __future__ import annotations

import json
import string

import pytest

from jaxlm.data.prompts import (
    FORMATS,
    format_prompt,
    instruction_text,
    truncate_to_tokens,
)
from jaxlm.errors import UsageError

CLARIQ = "task227_clariq_classification"


def _superni(shared_data, **kw):
    from jaxlm.data.sources import load_tasks

    return load_tasks("superni", shared_data / "superni", english_only=True, **kw)


@pytest.fixture(scope="module")
def superni(shared_data):
    return _superni(shared_data, max_instances=5)


def _collator_source(task_json: dict, instance: dict, tokenize, detokenize, max_source_length: int) -> tuple[str, bool]:
    """Tk-Instruct's DataCollatorForNI.__call__ for one instance, default settings (add_task_name=False,
    add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=False), written
    from the collator's code on the raw task JSON, then its final truncation."""
    task_input = "Now complete the following example -\n"
    task_input += f"Input: {instance['input'].strip()}"
    if task_input[-1] not in string.punctuation:
        task_input += "."
    task_input += "\n"
    task_input += "Output: "
    d = task_json["Definition"]
    definition = "Definition: " + (d[0] if isinstance(d, list) else d).strip()
    if definition[-1] not in string.punctuation:
        definition += "."
    definition += "\n\n"
    pos_examples = []
    for idx, ex in enumerate(task_json["Positive Examples"][:2]):
        s = f" Positive Example {idx+1} -\n"
        s += f"Input: {ex['input'].strip()}"
        if s[-1] not in string.punctuation:
            s += "."
        s += "\n"
        s += f" Output: {ex['output'].strip()}"
        if s[-1] not in string.punctuation:
            s += "."
        s += "\n"
        s += "\n"
        if len(tokenize(definition + " ".join(pos_examples) + s + task_input)) <= max_source_length:
            pos_examples.append(s)
        else:
            break
    source = definition + "".join(pos_examples) + task_input
    ids = tokenize(source)
    if len(ids) <= max_source_length:
        return source, False
    return detokenize(ids[:max_source_length]), True


def test_def_pos2_matches_collator_rules(shared_data, superni, smollm2):
    tok = smollm2.tokenizer
    memo: dict[str, list[int]] = {}
    encode = lambda s: memo[s] if s in memo else memo.setdefault(s, tok.encode(s))  # both sides tokenize the same strings
    files = sorted((shared_data / "superni" / "tasks").glob("*.json"))
    compared = dropped = truncated = 0
    for max_len in (1024, 300):
        for f in files:
            if f.stem not in superni:
                continue
            raw = json.loads(f.read_text())
            task = superni[f.stem]
            by_id = {inst.id: inst for inst in task.instances}
            for inst_json in raw["Instances"][:5]:
                ref, was_cut = _collator_source(raw, inst_json, encode, tok.decode, max_len)
                ours = format_prompt(task, by_id[inst_json["id"]], "def_pos2",
                                     count_tokens=lambda s: len(encode(s)), max_source_length=max_len)
                truncated += was_cut
                final = truncate_to_tokens(ours, tokenize=encode, detokenize=tok.decode, max_source_length=max_len)
                assert final == ref, (f.stem, inst_json["id"], max_len)
                dropped += ours.count(" Positive Example ") < min(2, len(raw["Positive Examples"]))
                compared += 1
    english = sum(1 for f in files if f.stem in superni)
    assert english >= 200 and compared == 2 * sum(min(5, len(superni[f.stem].instances)) for f in files if f.stem in superni)
    assert dropped > 0 and truncated > 0  # both of the collator's length rules were exercised


def test_def_exact_string_on_real_task(superni):
    task = superni[CLARIQ]
    inst = task.instances[0]
    expected = (
        "Definition: In this task, you are given an ambiguous question/query (which can be answered in more than "
        "one way) and a clarification statement to understand the query more precisely. Your task to classify "
        "that if the given clarification accurately clarifies the given query or not and based on that provide "
        "'Yes' or 'No'.\n\n"
        "Now complete the following example -\n"
        "Input: Query: Tell me about Barbados. \n Clarification: do you want to file your income tax online.\n"
        "Output: "
    )
    assert format_prompt(task, inst, "def") == expected
    pos2 = format_prompt(task, inst, "def_pos2")
    assert pos2 == expected.replace(
        "'No'.\n\n",
        "'No'.\n\n"
        " Positive Example 1 -\nInput: Query: Tell me about defender \n Clarification: are you referring to the "
        "arcade game called defender.\n Output: Yes.\n\n"
        " Positive Example 2 -\nInput: Query: I'm looking for information on hobby stores \n Clarification: are "
        "you interested in learning about treatments for von willebrand disease.\n Output: No.\n\n",
    )


def test_none_instruction_fewshot_on_real_task(superni):
    task = superni[CLARIQ]
    inst = task.instances[0]
    assert format_prompt(task, inst, "none") == inst.input.strip()
    assert format_prompt(task, inst, "instruction") == instruction_text(task) == "Definition: " + task.definition.strip()
    with2 = instruction_text(task, with_examples=2)
    assert with2.startswith(instruction_text(task)) and with2.endswith("Output: No.") and "Now complete" not in with2
    few = format_prompt(task, inst, "fewshot", num_shots=2)
    p1, p2 = task.positive_examples[:2]
    assert few == (f"Input: {p1.input.strip()}\nOutput: Yes\n\nInput: {p2.input.strip()}\nOutput: No\n\n"
                   f"Input: {inst.input.strip()}\nOutput: ")
    demos = [type(p1)(input=i.input, output=i.outputs[0]) for i in task.instances[1:4]]
    few3 = format_prompt(task, inst, "fewshot", num_shots=3, demos=demos)
    assert few3.count("Input: ") == 4 and few3.endswith("Output: ") and "Definition" not in few3
    assert format_prompt(task, inst, "fewshot", num_shots=0) == f"Input: {inst.input.strip()}\nOutput: "


def test_bigbench_native_format_on_real_multiple_choice_task(shared_data):
    from jaxlm.data.sources import load_tasks

    tasks = load_tasks("bigbench", shared_data / "bigbench", names=["phrase_relatedness", "swahili_english_proverbs"])
    task = tasks["phrase_relatedness"]
    inst = task.instances[0]
    assert inst.is_multiple_choice and inst.input == "home town"
    assert format_prompt(task, inst, "bigbench") == (
        "For each word or phrase, identify the most related choice from the listed options.\n"
        "\nQ: home town"
        "\n  choice: town center\n  choice: location\n  choice: native city\n  choice: home run"
        "\nA: "
    )
    sw = tasks["swahili_english_proverbs"]
    p = format_prompt(sw, sw.instances[0], "bigbench")
    assert p.startswith(sw.metadata["task_prefix"] + "\nSwahili proverb: " + sw.instances[0].input)
    assert p.endswith("\nEquivalent English proverb: ") and p.count("\n  choice: ") == len(sw.instances[0].options)


def test_truncation_keeps_first_tokens_and_bad_format_is_usage_error(superni, smollm2):
    tok = smollm2.tokenizer
    task = superni[CLARIQ]
    prompt = format_prompt(task, task.instances[0], "def_pos2")
    n = len(tok.encode(prompt))
    assert truncate_to_tokens(prompt, tokenize=tok.encode, detokenize=tok.decode, max_source_length=n) == prompt
    cut = truncate_to_tokens(prompt, tokenize=tok.encode, detokenize=tok.decode, max_source_length=20)
    assert prompt.startswith(cut) and len(tok.encode(cut)) == 20
    assert set(FORMATS) >= {"def", "def_pos2", "none", "instruction", "fewshot", "bigbench"}
    with pytest.raises(UsageError, match="'def_pos3'"):
        format_prompt(task, task.instances[0], "def_pos3")


def test_query_format_is_the_tagi_student_input_and_def_without_its_definition(superni):
    """`query` is the Tk query alone: exactly what TAGI's student rows read (task_examples, student
    format "query"), and the `def` prompt is the definition block followed by it."""
    from jaxlm.data.tagi_tasks import task_examples

    task = superni[CLARIQ]
    inst = task.instances[0]
    query = format_prompt(task, inst, "query")
    x = inst.input.strip()
    assert query == "Now complete the following example -\nInput: " + x + ("" if x[-1] in string.punctuation else ".") + \
        "\nOutput: "
    assert task_examples(task, student_format="query")[0][0] == query
    assert format_prompt(task, inst, "def").endswith("\n\n" + query)
