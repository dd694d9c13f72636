"""`jaxlm score` / `jaxlm generate`: output numbers equal the library's, errors are one line, resume works."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.checkpoints.peft import export_peft_adapter
from jaxlm.cli import main
from jaxlm.models import decoding
from jaxlm.models import lora as lora_lib
from tests.hf_tiny import tiny_llama_dir

ROWS = [
    {"input_ids": [5, 6, 7, 8], "target_ids": [9, 10]},
    {"input_ids": [11, 12], "target_ids": [13, 14, 15]},
    {"input_ids": [20, 21, 22, 23, 24, 25, 26], "target_ids": [27]},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("cli_llama"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_logprob(pre, inp, tgt, lora=None):
    seq = jnp.asarray([inp + tgt])
    logits = pre.model.apply({"params": pre.params}, seq, lora=lora)[0]
    lp = jax.nn.log_softmax(logits, -1)
    return float(sum(lp[len(inp) - 1 + j, t] for j, t in enumerate(tgt)))


def test_score_ids_match_direct_computation(tiny_dir, tmp_path):
    pre = jaxlm.load_pretrained(tiny_dir)
    inp = _write(tmp_path / "in.jsonl", ROWS)
    assert main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                 "--batch_size", "2"]) == 0
    out = _read(tmp_path / "out.jsonl")
    assert [o["target_ids"] for o in out] == [r["target_ids"] for r in ROWS]  # input order kept
    for row, o in zip(ROWS, out):
        assert o["num_tokens"] == len(row["target_ids"]) == len(o["token_logprobs"])
        assert o["logprob"] == pytest.approx(_reference_logprob(pre, row["input_ids"], row["target_ids"]), abs=1e-4)
        assert o["logprob"] == pytest.approx(sum(o["token_logprobs"]), abs=1e-5)


def test_progress_bars_on_a_terminal_only(tiny_dir, tmp_path, capsys, monkeypatch):
    """Loading and scoring show tqdm bars when forced on (a terminal); a log file gets none."""
    inp = _write(tmp_path / "in.jsonl", ROWS)
    args = ["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    monkeypatch.setenv("JAXLM_PROGRESS", "1")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "score: 100%" in err and f"{len(ROWS)}/{len(ROWS)}" in err and "tensor" in err  # lines, then tensors
    monkeypatch.delenv("JAXLM_PROGRESS")
    assert main(args) == 0  # captured stderr is not a TTY
    err = capsys.readouterr().err
    assert "100%" not in err and err.count("\n") == 1  # the one summary line


def test_score_with_peft_adapter(tiny_dir, tmp_path):
    pre = jaxlm.load_pretrained(tiny_dir)
    lora = lora_lib.init_lora(lora_lib.LoraSpec(("q_proj", "v_proj"), rank=2, alpha=4.0), pre.params, jax.random.PRNGKey(0))
    lora = lora.replace(params=jax.tree_util.tree_map(lambda x: x + 0.2, lora.params))
    adapter = export_peft_adapter(lora, pre, tmp_path / "adapter")
    inp = _write(tmp_path / "in.jsonl", ROWS[:1])
    assert main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                 "--adapter", str(adapter)]) == 0
    got = _read(tmp_path / "o.jsonl")[0]["logprob"]
    row = ROWS[0]
    assert got == pytest.approx(_reference_logprob(pre, row["input_ids"], row["target_ids"], lora), abs=1e-4)
    assert abs(got - _reference_logprob(pre, row["input_ids"], row["target_ids"])) > 1e-3


def test_generate_ids_match_decoder(tiny_dir, tmp_path):
    pre = jaxlm.load_pretrained(tiny_dir)
    inp = _write(tmp_path / "in.jsonl", [{"input_ids": r["input_ids"]} for r in ROWS])
    assert main(["generate", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "g.jsonl"),
                 "--max_new_tokens", "5"]) == 0
    for row, o in zip(ROWS, _read(tmp_path / "g.jsonl")):
        ids = jnp.asarray([row["input_ids"]])
        ref, n = decoding.greedy_generate(pre.model, pre.params, ids, jnp.ones_like(ids), max_new_tokens=5,
                                       eos_ids=pre.config.eos_token_ids)
        assert o["output_ids"] == np.asarray(ref)[0, : int(n[0])].tolist()
        assert o["prediction"] is None  # no tokenizer in this directory


def test_resume_keeps_complete_lines_and_drops_torn_one(tiny_dir, tmp_path):
    inp = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    first = {**ROWS[0], "logprob": -1.0, "num_tokens": 2, "token_logprobs": [-0.5, -0.5]}
    out.write_text(json.dumps(first) + "\n" + '{"input_ids": [11, 1')  # killed mid-line
    assert main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out), "--resume"]) == 0
    lines = _read(out)
    assert len(lines) == 3 and lines[0]["logprob"] == -1.0  # kept, not recomputed
    assert [line["target_ids"] for line in lines] == [r["target_ids"] for r in ROWS]


@pytest.mark.parametrize(
    "content, model, expected",
    [
        ('{"input_ids": [1, 2], "target_ids": [3]}\n{"inputs": 3, "target_ids": [3]}\n', None,
         "in.jsonl:2: field 'inputs' must be a string"),
        ('{"input_ids": [1, 2], "target_ids": [3]}\nnot json\n', None, "in.jsonl:2: not valid JSON"),
        ('{"target_ids": [1]}\n', None, "in.jsonl:1: needs 'inputs'"),
        ('{"input_ids": [1], "target_ids": [2]}\n', "/no/such/model", "/no/such/model: no such file"),
    ],
)
def test_errors_are_one_line_naming_the_problem(tiny_dir, tmp_path, capsys, content, model, expected):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    code = main(["score", "--model", model or str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("jaxlm: error:") and expected in err[0]


def test_param_dtype_flag_loads_the_weights_in_that_dtype(tiny_dir, tmp_path, monkeypatch, capsys):
    import jaxlm.checkpoints.pretrained as pretrained_mod

    loaded = []
    load = pretrained_mod.load_pretrained
    monkeypatch.setattr(pretrained_mod, "load_pretrained", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    inp = _write(tmp_path / "in.jsonl", ROWS)
    for dtype in ("float32", "bfloat16"):
        assert main(["score", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / f"{dtype}.jsonl"),
                     "--param_dtype", dtype]) == 0
        assert {x.dtype for x in jax.tree_util.tree_leaves(loaded[-1].params)} == {jnp.dtype(dtype)}
    half = jaxlm.load_pretrained(tiny_dir, param_dtype="bfloat16")
    for row, o in zip(ROWS, _read(tmp_path / "bfloat16.jsonl")):  # the bf16 weights' numbers, computed in float32
        assert o["logprob"] == pytest.approx(_reference_logprob(half, row["input_ids"], row["target_ids"]), abs=1e-4)
    assert [o["logprob"] for o in _read(tmp_path / "bfloat16.jsonl")] != [o["logprob"] for o in _read(tmp_path / "float32.jsonl")]
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_dir), "--input", str(inp), "--output", str(tmp_path / "g.jsonl"),
                 "--param_dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --param_dtype: invalid choice: 'int8'" in err[0], err


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    inp = _write(tmp_path / "in.jsonl", ROWS[:1])
    assert main(["score", "--model", str(tmp_path / "m"), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err


def test_generate_text_with_chat_and_stop_on_smollm2(smollm2, tmp_path, monkeypatch):
    import jaxlm.checkpoints.pretrained as pretrained_mod

    monkeypatch.setattr(pretrained_mod, "load_pretrained", lambda path, dtype="float32", param_dtype="float32": smollm2)
    inp = _write(tmp_path / "in.jsonl", [{"inputs": "List three colours, one per line."}, {"inputs": "What is 2+2?"}])
    assert main(["generate", "--model", "smollm2-135m-instruct", "--input", str(inp), "--output", str(tmp_path / "g.jsonl"),
                 "--chat", "--stop", "\n", "--max_new_tokens", "24"]) == 0
    out = _read(tmp_path / "g.jsonl")
    assert all("\n" not in o["prediction"] and o["output_ids"] for o in out)
    tok = smollm2.tokenizer
    assert out[0]["prediction"] == tok.decode(out[0]["output_ids"]).split("\n")[0]
    # Text scoring: the CLI's number is the engine's number for the same tokens.
    pairs = _write(tmp_path / "pairs.jsonl", [{"inputs": "The capital of France is", "targets": " Paris"}])
    assert main(["score", "--model", "smollm2-135m-instruct", "--input", str(pairs), "--output", str(tmp_path / "s.jsonl")]) == 0
    got = _read(tmp_path / "s.jsonl")[0]
    ref = _reference_logprob(smollm2, tok.encode("The capital of France is"), tok.encode(" Paris", add_special_tokens=False))
    assert got["logprob"] == pytest.approx(ref, abs=1e-3) and got["num_tokens"] == 1
