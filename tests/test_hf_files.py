"""The `datasets` local-files task sources: BIG-bench tasks converted to JSONL / Parquet / Arrow files in
the Super-NI and P3 schemas read back as the same instances as the JSON source, and register as seqio
tasks whose examples are the prompt builder's."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("datasets")

from jaxlm.data.sources import load_tasks  # noqa: E402
from jaxlm.errors import DataError  # noqa: E402

GENERATIVE = ["auto_debugging", "linguistic_mappings/plural_json"]
MULTIPLE_CHOICE = ["anachronisms", "analytic_entailment"]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_arrow(path, rows):
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _same_instances(got, want):
    assert [(i.id, i.input, i.outputs, i.options, i.option_scores) for i in got.instances] == \
        [(i.id, i.input, i.outputs, i.options, i.option_scores) for i in want.instances]
    assert got.definition == want.definition and got.categories == want.categories


def test_files_in_both_schemas_equal_the_json_source(shared_data, tmp_path):
    bigbench = load_tasks("bigbench", shared_data / "bigbench", names=GENERATIVE + MULTIPLE_CHOICE)
    superni_dir, p3_dir = tmp_path / "superni_files", tmp_path / "p3_files"
    for k, name in enumerate(GENERATIVE):  # Super-NI rows: input, output (all references)
        task = bigbench[name]
        rows = [{"id": i.id, "input": i.input, "output": list(i.outputs), "definition": task.definition,
                 "categories": list(task.categories)} for i in task.instances]
        (_write_jsonl if k == 0 else _write_parquet)(superni_dir / f"{name}{'.jsonl' if k == 0 else '.parquet'}", rows)
    for k, name in enumerate(MULTIPLE_CHOICE):  # P3 rows: inputs, targets, answer_choices
        task = bigbench[name]
        assert all(sorted(set(i.option_scores)) == [0.0, 1.0] and len(i.outputs) == 1 for i in task.instances)
        rows = [{"id": i.id, "inputs": i.input, "targets": i.outputs[0], "answer_choices": list(i.options),
                 "definition": task.definition, "categories": list(task.categories)} for i in task.instances]
        (_write_arrow if k == 0 else _write_parquet)(p3_dir / f"{name}{'.arrow' if k == 0 else '.parquet'}", rows)

    superni = load_tasks("superni_files", superni_dir)
    p3 = load_tasks("p3_files", p3_dir)
    assert sorted(superni) == sorted(GENERATIVE) and sorted(p3) == sorted(MULTIPLE_CHOICE)
    for name, task in {**superni, **p3}.items():
        _same_instances(task, bigbench[name])
        assert len(task.instances) > 10
    assert p3["anachronisms"].instances[0].is_multiple_choice
    assert list(load_tasks("p3_files", p3_dir, names=["analytic_entailment"], max_instances=3)) == ["analytic_entailment"]

    # registered as seqio tasks like the others: P3 prompts are the inputs themselves (format "none"),
    # Super-NI rows get def_pos2; the Task's tf.data pipeline gives the same ids as the Python path
    from jaxlm.data.batches import materialize_task
    from jaxlm.data.tasks import example_fields, register_tasks
    from jaxlm.data.vocab import byte_vocabulary

    v = byte_vocabulary()
    names = register_tasks("p3_files", p3_dir, vocabulary=v, names=["anachronisms"])
    assert names == ["p3_files:anachronisms"]
    tokenized = materialize_task(names[0], "train")
    through_tf_data = materialize_task(names[0], "train", via="seqio")
    assert np.array_equal(tokenized.inputs_flat, through_tf_data.inputs_flat)
    assert v.decode(tokenized.inputs(0).tolist()) == p3["anachronisms"].instances[0].input
    (name,) = register_tasks("superni_files", superni_dir, vocabulary=v, names=["auto_debugging"])
    want = example_fields(superni["auto_debugging"], 0, "def_pos2")["inputs"]
    assert want.startswith("Definition: ") and v.decode(materialize_task(name, "train").inputs(0).tolist()) == want


def test_files_outside_the_schema_are_data_errors_naming_the_file(tmp_path):
    _write_jsonl(tmp_path / "bad" / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"t\.jsonl: no column 'input'"):
        load_tasks("superni_files", tmp_path / "bad")
    _write_jsonl(tmp_path / "mc" / "t.jsonl", [{"inputs": "q", "targets": "c", "answer_choices": ["a", "b"]}])
    with pytest.raises(DataError, match=r"t\.jsonl: row 0: target 'c' is not one of its answer_choices"):
        load_tasks("p3_files", tmp_path / "mc")
    _write_jsonl(tmp_path / "ok" / "t.jsonl", [{"inputs_pretokenized": "q", "targets_pretokenized": "a"},
                                               {"inputs_pretokenized": "q2", "targets_pretokenized": ""}])
    (task,) = load_tasks("p3_files", tmp_path / "ok").values()
    assert [i.id for i in task.instances] == ["t-0"] and task.metadata["skipped_empty"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no task files"):
        load_tasks("p3_files", tmp_path / "empty")
