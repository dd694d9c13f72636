"""Tiny random transformers models saved as HF directories, shared by parity tests."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_dir(path: Path, tie: bool = False, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_mistral_dir(path: Path, sliding_window: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=sliding_window, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    MistralForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    return path


T5_VOCAB = 100


def tiny_t5_dir(path: Path, kind: str, seed: int = 0):
    """A v1.1-style (gated-gelu, untied, 3 decoder layers) or original (relu, tied) T5; returns the torch model."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    gated = kind == "v1_1"
    cfg = T5Config(
        vocab_size=T5_VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=3 if gated else 2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = T5ForConditionalGeneration(cfg).eval()
    if gated:  # transformers 5 ties lm_head even for v1.1 configs; real v1.1 / Flan heads are separate
        model.lm_head.weight = torch.nn.Parameter(torch.randn(T5_VOCAB, 32))
    model.save_pretrained(path, safe_serialization=True)
    return model
