"""Real weights: SmolLM2-135M-Instruct from its GGUF file against transformers loading the same file."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlm.checkpoints.pretrained import resolve_path
from jaxlm.models import decoding

TASKS = ["task1562_zest_text_modification", "task033_winogrande_answer_generation", "task1356_xlsum_title_generation"]


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def prompts(shared_data):
    out = []
    for name in TASKS:
        files = list((shared_data / "superni" / "tasks").glob(f"{name}.json"))
        if not files:
            continue
        task = json.loads(files[0].read_text())
        inst = task["Instances"][0]
        out.append(f"Definition: {task['Definition'][0]}\n\nInput: {inst['input']}\nOutput:"[:1500])
    out += ["The capital of France is", "Write 3 numbers: 17, 42 and 1000."]
    return out


def test_tokenizer_matches_transformers(smollm2, hf_smollm2, prompts):
    _, hf_tok = hf_smollm2
    for p in prompts:
        assert smollm2.tokenizer.encode(p) == hf_tok(p)["input_ids"]
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(p)) == p
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_logits_top1_agreement(smollm2, hf_smollm2, prompts):
    model, _ = hf_smollm2
    agree = total = 0
    worst = 0.0
    for p in prompts:
        ids = smollm2.tokenizer.encode(p)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(smollm2.model.apply({"params": smollm2.params}, jnp.asarray([ids])))[0]
        agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(ref - ours).max()))
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f}"
    assert worst < 1e-3  # same dequantized weights, fp32 on both sides


def test_greedy_batch_matches_transformers(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    tok = smollm2.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in ("What is 2+2?", "Name a colour.")]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.array([[tok.pad_id] * (width - len(r)) + r for r in rows])  # left padded
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out, lengths = decoding.greedy_generate(
        smollm2.model, smollm2.params, jnp.asarray(ids), jnp.asarray(mask),
        max_new_tokens=16, eos_ids=tuple(tok.eos_ids), pad_id=tok.pad_id,
    )
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = model.generate(torch.tensor([r]), max_new_tokens=16, do_sample=False, eos_token_id=list(tok.eos_ids),
                                 pad_token_id=tok.pad_id)[0, len(r):].tolist()
        ref = [t for t in ref if t not in tok.eos_ids and t != tok.pad_id]
        assert np.asarray(out)[i, : int(lengths[i])].tolist() == ref


def test_export_gguf_model_to_hf_dir(smollm2, hf_smollm2, prompts, tmp_path):
    """GGUF -> HF directory: transformers loads weights and tokenizer; same logits and ids as ours."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from jaxlm.checkpoints.pretrained import export_hf

    out = export_hf(smollm2, tmp_path / "smollm2_hf")
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = smollm2.tokenizer.encode(prompts[0])
    assert tok(prompts[0])["input_ids"] == ids
    assert tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(smollm2.model.apply({"params": smollm2.params}, jnp.asarray([ids])))[0]
    assert np.abs(ref - ours).max() < 1e-3
