"""BERT parity with transformers (tiny random config, padded batch), the real all-MiniLM-L6-v2 against
sentence-transformers on SuperNI instruction definitions, and the HF export round trip."""

import json

import jax
import numpy as np
import pytest
import torch

import jaxlm
from jaxlm.checkpoints.pretrained import export_hf, family, resolve_path
from jaxlm.models import embedder as emb
from jaxlm.models import lora as lora_lib

VOCAB = 100

hf_name = family("bert").hf_name


def _padded_batch():
    """Right-padded ids of lengths 9, 5, 2 with mixed token types on the first row."""
    rng = np.random.default_rng(0)
    ids, mask, types = np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64)
    for i, n in enumerate([9, 5, 2]):
        ids[i, :n], mask[i, :n] = rng.integers(1, VOCAB, n), 1
    types[0, 5:] = 1
    return ids, mask, types


def _hf_hidden(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    return out.last_hidden_state.numpy()


def _max_diff_real(a, b, mask):
    return np.abs(a - b)[mask.astype(bool)].max()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm affines so a swapped weight/bias would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("bert_tiny")
    model.save_pretrained(path, safe_serialization=True)
    return jaxlm.load_pretrained(path), model


def test_hf_names_and_axes(tiny):
    pretrained, _ = tiny
    p = pretrained.params["encoder"]["layer_1"]
    assert p["attention"]["self"]["query"]["kernel"].shape == (32, 32)
    assert hf_name(("encoder", "layer_1", "attention", "self", "query", "kernel")) == "encoder.layer.1.attention.self.query.weight"
    assert hf_name(("embeddings", "LayerNorm", "bias")) == "embeddings.LayerNorm.bias"
    assert hf_name(("embeddings", "word_embeddings", "embedding")) == "embeddings.word_embeddings.weight"
    axes = pretrained.logical_axes()["encoder"]["layer_0"]
    assert tuple(axes["attention"]["self"]["key"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["attention"]["output"]["dense"]["kernel"]) == ("heads", "embed")
    assert tuple(axes["intermediate"]["dense"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["output"]["dense"]["kernel"]) == ("mlp", "embed")
    assert pretrained.tokenizer is None


def test_parity_with_transformers(tiny):
    pretrained, hf_model = tiny
    ids, mask, types = _padded_batch()
    ours = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, types))
    assert ours.dtype == np.float32 and ours.shape == (3, 9, 32)
    assert _max_diff_real(ours, _hf_hidden(hf_model, ids, mask, types), mask) <= 1e-4


def test_zero_lora_is_identity_and_merge_matches(tiny):
    pretrained, _ = tiny
    ids, mask, _ = _padded_batch()
    model, params = pretrained.model, pretrained.params
    base = model.apply({"params": params}, ids, mask)
    lora = lora_lib.init_lora(lora_lib.LoraSpec(("query", "value", "dense")), params, jax.random.PRNGKey(1))
    assert np.abs(np.asarray(model.apply({"params": params}, ids, mask, lora=lora)) - np.asarray(base)).max() == 0
    lora = lora.replace(params=jax.tree_util.tree_map(lambda x: x + 0.05, lora.params))
    adapted = model.apply({"params": params}, ids, mask, lora=lora)
    merged = model.apply({"params": lora_lib.merge(params, lora)}, ids, mask)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    assert _max_diff_real(np.asarray(adapted), np.asarray(merged), mask) <= 1e-4


def test_export_round_trip(tiny, tmp_path):
    from transformers import BertModel

    pretrained, hf_model = tiny
    out = export_hf(pretrained, tmp_path / "export")
    reloaded = BertModel.from_pretrained(out, add_pooling_layer=False).eval()
    ids, mask, types = _padded_batch()
    assert _max_diff_real(_hf_hidden(reloaded, ids, mask, types), _hf_hidden(hf_model, ids, mask, types), mask) <= 1e-4
    again = jaxlm.load_pretrained(out)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), again.params, pretrained.params))


# ----------------------------------------------------------------------------- real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    return jaxlm.load_pretrained("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def sentences(shared_data):
    files = sorted((shared_data / "superni" / "tasks").glob("*.json"))[:6]
    defs = [json.loads(f.read_text())["Definition"][0].strip() for f in files]
    long_text = " ".join(defs * 3)  # > 256 tokens: exercises truncation at max_seq_length
    return defs + ["Translate the sentence into French.", "Is this review positive?", long_text]


def test_minilm_matches_sentence_transformers(minilm, sentences):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model_dir = str(resolve_path("all-minilm-l6-v2"))
    embedder = emb.SentenceEmbedder(minilm)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    ours_ids = embedder.tokenize(sentences, max_length=256)
    assert ours_ids == [hf_tok(s, truncation=True, max_length=256)["input_ids"] for s in sentences]
    assert len(ours_ids[-1]) == 256

    ours = embedder.embed(sentences, batch_size=4)
    st = SentenceTransformer(model_dir, device="cpu")
    assert st.max_seq_length == 256
    ref = st.encode(sentences, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(sentences), 384)
    cos = (ours * ref).sum(-1)
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)

    sim = emb.cosine_similarity_matrix(ours, ours)
    assert np.allclose(np.diag(sim), 1.0, atol=1e-5) and np.allclose(sim, sim.T, atol=1e-6)
    # order-independence: one text alone embeds the same as inside a length-sorted batch
    assert np.abs(embedder.embed(sentences[1:2]) - ours[1:2]).max() < 1e-5
    assert embedder.num_compiled <= 4


def test_minilm_tokenizer_encode_matches_transformers(minilm, sentences):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(resolve_path("all-minilm-l6-v2")))
    assert [minilm.tokenizer.encode(s) for s in sentences[:-1]] == [hf_tok(s)["input_ids"] for s in sentences[:-1]]


def test_pooling_helpers():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    pooled = np.asarray(emb.mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled[0], hidden[0, :2].mean(0))
    np.testing.assert_allclose(pooled[1], 0.0)
    unit = np.asarray(emb.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])


def test_length_buckets_are_bounded():
    from jaxlm.buckets import bucket_length, pad_rows, powers_of_two

    assert powers_of_two(256, 16) == (16, 32, 64, 128, 256) and powers_of_two(6) == (1, 2, 4, 6)
    assert [bucket_length(n, powers_of_two(256, 16)) for n in (1, 17, 256)] == [16, 32, 256]
    assert bucket_length(300, (16, 32)) == 320  # past the largest bucket: next multiple of it
    ids, mask = pad_rows([[5, 6], [7]], 3, pad_id=0, left=True)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7]] and mask.sum() == 3
    with pytest.raises(ValueError, match="row 0 has 2 tokens"):
        pad_rows([[1, 2]], 1, pad_id=0)
