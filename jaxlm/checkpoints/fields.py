"""Every key of the checkpoint formats jaxlm reads, marked used, ignored (with why) or refused.

One table per format (`TABLES`): Hugging Face `generation_config.json`, the `config.json` of each
supported architecture, PEFT's `adapter_config.json` and GGUF metadata. The loaders call `refuse`
with the parsed file, so a refused key set to anything but a neutral value fails in one line naming
the file and the key; `tests/test_config_keys.py` fails when the installed transformers / peft /
gguf know a key this table does not, so a new field surfaces the day a library adds it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from jaxlm.checkpoints.hf import CheckpointError

USED, IGNORED, REFUSED = "used", "ignored", "refused"


@dataclasses.dataclass(frozen=True)
class Field:
    """How jaxlm treats one key.

    Attributes:
      status: USED (read and honoured), IGNORED (cannot change jaxlm's outputs; `reason` says why) or
        REFUSED (would change outputs and is not implemented; `reason` says what it does).
      reason: why the key is ignored or refused (empty for used keys).
      neutral: values of a refused key that mean "off" and are accepted (None is always accepted).
      kind: the JSON type a used key must have ("int", "float", "bool", "str", "ids": an int or a list
        of ints), checked by `check_types`; None: not checked.
    """

    status: str
    reason: str = ""
    neutral: tuple[Any, ...] = ()
    kind: str | None = None

    def accepts(self, value: Any) -> bool:
        """True when a REFUSED key's `value` is None, empty or one of its neutral values."""
        return value is None or value == [] or value == {} or value in self.neutral


def used(reason: str = "", kind: str | None = None) -> Field:
    return Field(USED, reason, (), kind)


def ignored(reason: str) -> Field:
    return Field(IGNORED, reason)


def refused(reason: str, *neutral: Any) -> Field:
    return Field(REFUSED, reason, tuple(neutral))


_SAMPLING = ("jaxlm generate is greedy unless --temperature > 0 asks for sampling (documented): the file's "
             "sampling settings never switch it on")
_OUTPUT_ONLY = "changes what transformers returns or how fast, never the tokens"
_SPECULATIVE = "assisted/speculative decoding in transformers returns greedy's tokens"

GENERATION_CONFIG: dict[str, Field] = {
    "eos_token_id": used("ends greedy decoding (an int or a list, e.g. Llama 3's [128001, 128009])"),
    "bos_token_id": ignored("prompts are tokenized by the tokenizer, which knows the BOS token"),
    "pad_token_id": ignored("padding is masked; jaxlm returns unpadded outputs"),
    "decoder_start_token_id": used("T5's first decoder token, replacing config.json's (decoder-only models have none)"),
    "max_length": ignored("the output length is --max_new_tokens (jaxlm generate) / max_new_tokens (Engine)"),
    "max_new_tokens": ignored("the output length is --max_new_tokens (jaxlm generate) / max_new_tokens (Engine)"),
    "min_length": refused("suppresses EOS before a minimum length", 0),
    "min_new_tokens": refused("suppresses EOS before a minimum number of new tokens", 0),
    "early_stopping": ignored("beam search only; jaxlm refuses num_beams > 1"),
    "max_time": ignored("a wall-clock limit, not part of the model's output"),
    "stop_strings": refused("ends decoding at strings; pass --stop instead"),
    "do_sample": ignored(_SAMPLING),
    "num_beams": refused("beam search", 1),
    "num_beam_groups": refused("diverse beam search", 1),
    "diversity_penalty": refused("diverse beam search", 0.0),
    "penalty_alpha": refused("contrastive search changes greedy's choice", 0.0),
    "dola_layers": refused("DoLa decoding changes the logits"),
    "use_mtp": ignored(_SPECULATIVE),
    "use_cache": ignored(_OUTPUT_ONLY),
    "cache_implementation": ignored(_OUTPUT_ONLY),
    "cache_config": ignored(_OUTPUT_ONLY),
    "max_cache_len": ignored(_OUTPUT_ONLY),
    "temperature": ignored(_SAMPLING),
    "top_k": ignored(_SAMPLING),
    "top_p": ignored(_SAMPLING),
    "min_p": ignored(_SAMPLING),
    "top_h": ignored(_SAMPLING),
    "typical_p": ignored(_SAMPLING),
    "epsilon_cutoff": ignored(_SAMPLING),
    "eta_cutoff": ignored(_SAMPLING),
    "repetition_penalty": refused("rescales the logits of tokens already seen", 1.0),
    "encoder_repetition_penalty": refused("rescales the logits of encoder tokens", 1.0),
    "length_penalty": ignored("beam search only; jaxlm refuses num_beams > 1"),
    "no_repeat_ngram_size": refused("bans repeated n-grams", 0),
    "encoder_no_repeat_ngram_size": refused("bans n-grams of the encoder input", 0),
    "bad_words_ids": refused("bans token sequences"),
    "force_words_ids": refused("constrained beam search"),
    "constraints": refused("constrained beam search"),
    "renormalize_logits": ignored("greedy takes the argmax, which renormalizing does not move"),
    "forced_bos_token_id": refused("forces the first generated token"),
    "forced_eos_token_id": refused("forces EOS at max_length"),
    "remove_invalid_values": ignored("only replaces NaN/inf logits, which a working model does not produce"),
    "exponential_decay_length_penalty": refused("raises the EOS logit with length"),
    "suppress_tokens": refused("bans tokens"),
    "begin_suppress_tokens": refused("bans tokens at the first step"),
    "sequence_bias": refused("adds biases to token sequences"),
    "token_healing": refused("rewrites the prompt's last tokens", False),
    "guidance_scale": refused("classifier-free guidance", 1.0),
    "watermarking_config": refused("watermarking changes the logits"),
    "num_return_sequences": refused("several sequences per prompt", 1),
    "output_attentions": ignored(_OUTPUT_ONLY),
    "output_hidden_states": ignored(_OUTPUT_ONLY),
    "output_scores": ignored(_OUTPUT_ONLY),
    "output_logits": ignored(_OUTPUT_ONLY),
    "return_dict_in_generate": ignored(_OUTPUT_ONLY),
    "is_assistant": ignored(_SPECULATIVE),
    "num_assistant_tokens": ignored(_SPECULATIVE),
    "num_assistant_tokens_schedule": ignored(_SPECULATIVE),
    "assistant_confidence_threshold": ignored(_SPECULATIVE),
    "prompt_lookup_num_tokens": ignored(_SPECULATIVE),
    "max_matching_ngram_size": ignored(_SPECULATIVE),
    "assistant_early_exit": ignored(_SPECULATIVE),
    "assistant_lookbehind": ignored(_SPECULATIVE),
    "target_lookbehind": ignored(_SPECULATIVE),
    "assistant_ensemble_weight": ignored(_SPECULATIVE),
    "speculation_type": ignored(_SPECULATIVE),
    "compile_config": ignored(_OUTPUT_ONLY),
    "disable_compile": ignored(_OUTPUT_ONLY),
    "continuous_batching_config": ignored(_OUTPUT_ONLY),
    "prefill_chunk_size": ignored(_OUTPUT_ONLY),
    "low_memory": ignored(_OUTPUT_ONLY),
    "transformers_version": ignored("the writer's version"),
    "_from_model_config": ignored("transformers bookkeeping"),
}

_SELECTS = "selects which modules get an adapter; the file's tensors are exactly those modules"
_INIT_ONLY = "initialises A/B before training; the file holds the trained A/B"
_BOOKKEEPING = "peft bookkeeping, not part of the adapter's function"

ADAPTER_CONFIG: dict[str, Field] = {
    "r": used("default rank (the scale is lora_alpha / r)"),
    "lora_alpha": used("default alpha"),
    "rank_pattern": used("per-module rank, matched as peft's get_pattern_key"),
    "alpha_pattern": used("per-module alpha, matched as peft's get_pattern_key"),
    "use_rslora": used("scale lora_alpha / sqrt(r)"),
    "modules_to_save": used("full copies of base modules replace the base params (load_peft_model)"),
    "peft_type": used("only LORA is read; any other type is refused"),
    "target_modules": ignored(_SELECTS),
    "exclude_modules": ignored(_SELECTS),
    "layers_to_transform": ignored(_SELECTS),
    "layers_pattern": ignored(_SELECTS),
    "ensure_weight_tying": ignored("ties adapters of tied modules; the file's tensors are what is applied"),
    "lora_dropout": ignored("training-time dropout; inference does not drop"),
    "inference_mode": ignored(_BOOKKEEPING),
    "task_type": ignored(_BOOKKEEPING),
    "auto_mapping": ignored(_BOOKKEEPING),
    "peft_version": ignored(_BOOKKEEPING),
    "base_model_name_or_path": ignored("names the base; the caller chooses the base it loads"),
    "revision": ignored("a hub revision of the base; the caller chooses the base it loads"),
    "megatron_config": ignored("Megatron tensor-parallel layout of the same function"),
    "megatron_core": ignored("Megatron tensor-parallel layout of the same function"),
    "runtime_config": ignored("ephemeral GPU offload; a placement setting"),
    "qalora_group_size": ignored("used only with use_qalora, which is refused"),
    "eva_config": ignored(_INIT_ONLY),
    "loftq_config": ignored("used only with init_lora_weights='loftq', which is refused"),
    "corda_config": ignored("used only with init_lora_weights='corda', which is refused"),
    "lora_ga_config": ignored("used only with init_lora_weights='lora_ga', which is refused"),
    "init_lora_weights": refused(
        "pissa/olora/corda/loftq/lora_ga/mica initialisation rewrites the base weights, which the file does not hold",
        True, False, "gaussian", "eva", "orthogonal"),
    "fan_in_fan_out": refused("GPT-2 Conv1D (in, out) layout; jaxlm's families have none", False),
    "bias": refused("trained base biases are saved beside the adapter", "none"),
    "lora_bias": refused("a bias on lora_B", False),
    "use_dora": refused("DoRA weight decomposition", False),
    "use_qalora": refused("quantization-aware LoRA pooling", False),
    "use_bdlora": refused("block-diagonal LoRA", False),
    "target_parameters": refused("LoRA on raw parameters (MoE experts)"),
    "trainable_token_indices": refused("trained rows of the embedding"),
    "layer_replication": refused("replicates base layers"),
    "alora_invocation_tokens": refused("activated LoRA applies the adapter only after these tokens"),
    "arrow_config": refused("Arrow routing between adapters"),
    "monteclora_config": refused("Monte Carlo LoRA adds variational sampling on top of the adapters"),
    "kasa_config": refused("KaSA truncates the base weight's smallest singular components and adds a diagonal"),
    "velora_config": ignored("VeLoRA changes only what the backward pass stores; the forward is plain LoRA"),
}

_DESCRIPTIVE = "descriptive metadata"
_OTHER_ARCH = "a hyperparameter of other architectures (MoE, MLA, SSM, RWKV, Gemma, ...) that changes their numbers"
_GGUF_OTHER_ARCH = (
    "{arch}.embedding_length_out", "{arch}.features_length", "{arch}.leading_dense_block_count",
    "{arch}.expert_feed_forward_length", "{arch}.expert_shared_feed_forward_length",
    "{arch}.expert_chunk_feed_forward_length", "{arch}.use_parallel_residual", "{arch}.tensor_data_layout",
    "{arch}.expert_count", "{arch}.expert_used_count", "{arch}.expert_shared_count", "{arch}.expert_group_count",
    "{arch}.expert_group_used_count", "{arch}.expert_weights_scale", "{arch}.expert_weights_norm",
    "{arch}.expert_gating_func", "{arch}.expert_group_scale", "{arch}.experts_per_group", "{arch}.moe_every_n_layers",
    "{arch}.moe_latent_size", "{arch}.nextn_predict_layers", "{arch}.n_deepstack_layers", "{arch}.pooling_type",
    "{arch}.logit_scale", "{arch}.decoder_start_token_id", "{arch}.decoder_block_count",
    "{arch}.attn_logit_softcapping", "{arch}.router_logit_softcapping", "{arch}.final_logit_softcapping",
    "{arch}.swin_norm", "{arch}.rescale_every_n_layers", "{arch}.time_mix_extra_dim", "{arch}.time_decay_extra_dim",
    "{arch}.residual_scale", "{arch}.embedding_scale", "{arch}.token_shift_count", "{arch}.interleave_moe_layer_step",
    "{arch}.full_attention_interval", "{arch}.activation_sparsity_scale", "{arch}.altup.active_idx",
    "{arch}.altup.num_inputs", "{arch}.embedding_length_per_layer_input", "{arch}.swiglu_clamp_exp",
    "{arch}.swiglu_clamp_shexp", "{arch}.{dense}_feat_in", "{arch}.{dense}_feat_out",
    "{arch}.attention.max_alibi_bias", "{arch}.attention.clamp_kqv", "{arch}.attention.layer_norm_epsilon",
    "{arch}.attention.group_norm_epsilon", "{arch}.attention.group_norm_groups", "{arch}.attention.q_lora_rank",
    "{arch}.attention.kv_lora_rank", "{arch}.attention.decay_lora_rank", "{arch}.attention.iclr_lora_rank",
    "{arch}.attention.value_residual_mix_lora_rank", "{arch}.attention.gate_lora_rank",
    "{arch}.attention.relative_buckets_count", "{arch}.attention.scale", "{arch}.attention.output_scale",
    "{arch}.attention.temperature_length", "{arch}.attention.key_length_mla", "{arch}.attention.value_length_mla",
    "{arch}.attention.key_length_swa", "{arch}.attention.value_length_swa", "{arch}.attention.shared_kv_layers",
    "{arch}.attention.sliding_window_pattern", "{arch}.attention.temperature_scale",
    "{arch}.rope.dimension_count_swa", "{arch}.rope.dimension_sections", "{arch}.rope.freq_base_swa",
    "{arch}.rope.scaling.alpha", "{arch}.ssm.conv_kernel", "{arch}.ssm.inner_size", "{arch}.ssm.state_size",
    "{arch}.ssm.time_step_rank", "{arch}.ssm.group_count", "{arch}.ssm.dt_b_c_rms", "{arch}.wkv.head_size",
    "{arch}.posnet.embedding_length", "{arch}.posnet.block_count", "{arch}.convnext.embedding_length",
    "{arch}.convnext.block_count", "{arch}.classifier.output_labels", "{arch}.shortconv.l_cache",
    "{arch}.kda.head_dim",
)
# Neutral values llama.cpp writes for llama files that do not use the feature.
_GGUF_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "{arch}.expert_count": (0,), "{arch}.expert_used_count": (0,), "{arch}.use_parallel_residual": (False,),
    "{arch}.leading_dense_block_count": (0,), "{arch}.nextn_predict_layers": (0,), "{arch}.logit_scale": (1.0,),
    "{arch}.residual_scale": (1.0,), "{arch}.embedding_scale": (1.0,), "{arch}.attention.max_alibi_bias": (0.0,),
    "{arch}.attention.clamp_kqv": (0.0,), "{arch}.attn_logit_softcapping": (0.0,),
    "{arch}.final_logit_softcapping": (0.0,),
}
_GGUF_DESCRIPTIVE = (
    "general.name", "general.author", "general.version", "general.organization", "general.finetune",
    "general.basename", "general.description", "general.quantized_by", "general.size_label", "general.license",
    "general.license.name", "general.license.link", "general.url", "general.doi", "general.uuid", "general.repo_url",
    "general.source.url", "general.source.doi", "general.source.uuid", "general.source.repo_url",
    "general.base_model.count", "general.base_model.{id}.name", "general.base_model.{id}.author",
    "general.base_model.{id}.version", "general.base_model.{id}.organization", "general.base_model.{id}.description",
    "general.base_model.{id}.url", "general.base_model.{id}.doi", "general.base_model.{id}.uuid",
    "general.base_model.{id}.repo_url", "general.dataset.count", "general.dataset.{id}.name",
    "general.dataset.{id}.author", "general.dataset.{id}.version", "general.dataset.{id}.organization",
    "general.dataset.{id}.description", "general.dataset.{id}.url", "general.dataset.{id}.doi",
    "general.dataset.{id}.uuid", "general.dataset.{id}.repo_url", "general.tags", "general.languages",
)
_GGUF_SAMPLING = (
    "general.sampling.sequence", "general.sampling.top_k", "general.sampling.top_p", "general.sampling.min_p",
    "general.sampling.xtc_probability", "general.sampling.xtc_threshold", "general.sampling.temp",
    "general.sampling.penalty_last_n", "general.sampling.penalty_repeat", "general.sampling.mirostat",
    "general.sampling.mirostat_tau", "general.sampling.mirostat_eta",
)
_TOKEN_ID = "a special token id jaxlm does not insert (fill-in-the-middle, separators, ...)"

GGUF: dict[str, Field] = {
    "general.architecture": used("llama or mistral; others are refused by name"),
    "general.type": refused("a GGUF that is not a model (a LoRA adapter, a vision projector)", "model"),
    "general.quantization_version": ignored("the gguf package dequantizes every supported tensor type"),
    "general.alignment": ignored("byte layout, read by the gguf package"),
    "general.file_type": ignored("each tensor states its own type"),
    **{k: ignored(_DESCRIPTIVE) for k in _GGUF_DESCRIPTIVE},
    **{k: ignored(_SAMPLING) for k in _GGUF_SAMPLING},
    "{arch}.vocab_size": used("V (else the token count)"),
    "{arch}.context_length": used("max_position_embeddings"),
    "{arch}.embedding_length": used("hidden_size"),
    "{arch}.block_count": used("num_layers"),
    "{arch}.feed_forward_length": used("intermediate_size"),
    "{arch}.attention.head_count": used("num_heads"),
    "{arch}.attention.head_count_kv": used("num_kv_heads"),
    "{arch}.attention.key_length": used("head_dim"),
    "{arch}.attention.value_length": used("must equal key_length (refused otherwise)"),
    "{arch}.attention.layer_norm_rms_epsilon": used("rms_norm_eps"),
    "{arch}.attention.causal": refused("non-causal attention", True),
    "{arch}.attention.sliding_window": used("Mistral's sliding window"),
    "{arch}.rope.dimension_count": used("must equal head_dim: partial rotary is refused"),
    "{arch}.rope.freq_base": used("rope_theta"),
    "{arch}.rope.scaling.type": used("none, linear or yarn; others refused"),
    "{arch}.rope.scaling.factor": used("the scaling factor"),
    "{arch}.rope.scaling.original_context_length": used("yarn's original context"),
    "{arch}.rope.scaling.yarn_beta_fast": used("yarn's beta_fast"),
    "{arch}.rope.scaling.yarn_beta_slow": used("yarn's beta_slow"),
    "{arch}.rope.scaling.finetuned": ignored("records whether the model was fine-tuned with the scaling"),
    "{arch}.rope.scaling.attn_factor": refused("llama.cpp's extra attention scale", 1.0),
    "{arch}.rope.scaling.yarn_log_multiplier": refused("DeepSeek's yarn mscale multiplier", 0.0),
    "{arch}.rope.scaling.yarn_ext_factor": refused("llama.cpp's yarn extrapolation mix override", -1.0),
    "{arch}.rope.scaling.yarn_attn_factor": refused("llama.cpp's yarn attention factor override", 1.0),
    **{k: refused(_OTHER_ARCH, *_GGUF_NEUTRAL.get(k, ())) for k in _GGUF_OTHER_ARCH},
    "split.no": ignored("which part of a split file this is"),
    "split.count": refused("a model split over several .gguf files; merge them with llama-gguf-split", 0, 1),
    "split.tensors.count": ignored("tensor count over the split files"),
    "adapter.type": refused("a GGUF LoRA adapter, not a model"),
    "adapter.lora.alpha": refused("a GGUF LoRA adapter, not a model"),
    "adapter.lora.task_name": refused("a GGUF LoRA adapter, not a model"),
    "adapter.lora.prompt_prefix": refused("a GGUF LoRA adapter, not a model"),
    "adapter.alora.invocation_tokens": refused("a GGUF activated-LoRA adapter, not a model"),
    "tokenizer.ggml.model": used("gpt2 (byte-level BPE) or llama (SentencePiece BPE); others refused"),
    "tokenizer.ggml.pre": used("the byte-level pre-tokenizer split; unknown ones refused"),
    "tokenizer.ggml.tokens": used("the vocabulary"),
    "tokenizer.ggml.token_type": used("control (special) and user-defined tokens"),
    "tokenizer.ggml.token_type_count": ignored("the number of token types, implied by token_type"),
    "tokenizer.ggml.scores": used("SentencePiece merge priorities when the file has no merges"),
    "tokenizer.ggml.merges": used("BPE merges"),
    "tokenizer.ggml.bos_token_id": used("BOS"),
    "tokenizer.ggml.eos_token_id": used("EOS"),
    "tokenizer.ggml.eot_token_id": used("end of turn: ends generation beside EOS, as in llama.cpp (Llama 3's <|eot_id|>)"),
    "tokenizer.ggml.eom_token_id": used("end of message: ends generation beside EOS, as in llama.cpp"),
    "tokenizer.ggml.unknown_token_id": ignored("byte fallback / byte-level BPE never emit the unknown token"),
    "tokenizer.ggml.seperator_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.padding_token_id": used("pad id"),
    "tokenizer.ggml.mask_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.add_bos_token": used("BOS on encode (SentencePiece default: true)"),
    "tokenizer.ggml.add_eos_token": used("EOS on encode"),
    "tokenizer.ggml.add_sep_token": refused("a separator appended on encode", False),
    "tokenizer.ggml.add_space_prefix": used("true is the SentencePiece default; false refused"),
    "tokenizer.ggml.remove_extra_whitespaces": refused("whitespace normalisation before SentencePiece", False),
    "tokenizer.ggml.precompiled_charsmap": refused("a SentencePiece normaliser (T5 / Unigram tokenizers)"),
    "tokenizer.huggingface.json": refused("a whole tokenizer.json embedded in the file"),
    "tokenizer.rwkv.world": refused("the RWKV world tokenizer"),
    "tokenizer.chat_template": used("the chat template"),
    "tokenizer.chat_template.{name}": ignored("named extra templates (tool use); `--chat` renders the default one"),
    "tokenizer.chat_templates": ignored("the names of the extra templates"),
    "tokenizer.ggml.fim_pre_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.fim_suf_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.fim_mid_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.fim_pad_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.fim_rep_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.fim_sep_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.prefix_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.suffix_token_id": ignored(_TOKEN_ID),
    "tokenizer.ggml.middle_token_id": ignored(_TOKEN_ID),
}

# ---------------------------------------------------------------- config.json of each architecture

_DROPOUT = "dropout: jaxlm's forward is deterministic (transformers applies it only in train mode)"
_HF_BOOKKEEPING = "transformers bookkeeping (output format, task heads, labels), not the base model's function"
_INIT = "initialisation of new weights; loaded weights are what they are"
_COMMON: dict[str, Field] = {
    "architectures": used("picks the family (LlamaForCausalLM, MistralForCausalLM, T5ForConditionalGeneration, Bert*)"),
    "model_type": ignored("the architecture decides"),
    "transformers_version": ignored("the writer's version"),
    "_name_or_path": ignored("where transformers loaded it from"),
    "output_hidden_states": ignored(_HF_BOOKKEEPING),
    "output_attentions": ignored(_HF_BOOKKEEPING),
    "return_dict": ignored(_HF_BOOKKEEPING),
    "id2label": ignored(_HF_BOOKKEEPING),
    "label2id": ignored(_HF_BOOKKEEPING),
    "problem_type": ignored(_HF_BOOKKEEPING),
    "is_encoder_decoder": ignored("implied by the architecture"),
    "chunk_size_feed_forward": ignored("chunks the feed-forward computation; the same numbers"),
    "use_cache": ignored("a decoding-speed switch; jaxlm's engine always caches"),
    "dtype": ignored("the stored tensors' dtype; jaxlm's dtype/param_dtype choose the computation"),
    "torch_dtype": ignored("the stored tensors' dtype (transformers 4 name); jaxlm's dtype/param_dtype choose"),
    "initializer_range": ignored(_INIT),
    "pad_token_id": used("padding id", "int"),
    "bos_token_id": used("BOS id", "int"),
    "eos_token_id": used("EOS id(s)", "ids"),
    "tie_word_embeddings": used("logits from the embedding table", "bool"),
    "vocab_size": used("V", "int"),
}
_DECODER: dict[str, Field] = {
    **_COMMON,
    "hidden_size": used("D", "int"),
    "intermediate_size": used("MLP width", "int"),
    "num_hidden_layers": used("layers", "int"),
    "num_attention_heads": used("query heads", "int"),
    "num_key_value_heads": used("key/value heads", "int"),
    "head_dim": used("per-head width", "int"),
    "hidden_act": refused("the MLP activation; jaxlm's SwiGLU uses silu (= swish)", "silu", "swish"),
    "max_position_embeddings": used("context length (dynamic/yarn RoPE read it)", "int"),
    "rms_norm_eps": used("RMSNorm epsilon", "float"),
    "rope_parameters": used("rope_theta and the RoPE scaling (linear, dynamic, yarn, llama3; others refused)"),
    "rope_theta": used("RoPE base (transformers 4 name)", "float"),
    "rope_scaling": used("RoPE scaling (transformers 4 name)"),
    "attention_dropout": ignored(_DROPOUT),
}
LLAMA_CONFIG: dict[str, Field] = {
    **_DECODER,
    "attention_bias": used("q/k/v/o biases", "bool"),
    "mlp_bias": used("MLP biases", "bool"),
    "pretraining_tp": ignored("transformers 5 no longer reads it (4 split matmuls for the same function)"),
}
MISTRAL_CONFIG: dict[str, Field] = {
    **_DECODER,
    "sliding_window": used("attention window in tokens", "int"),
    "use_sliding_window": used("Qwen-style switch for the window", "bool"),
}
T5_CONFIG: dict[str, Field] = {
    **_COMMON,
    "d_model": used("D", "int"),
    "d_kv": used("per-head width", "int"),
    "d_ff": used("MLP width", "int"),
    "num_layers": used("encoder layers", "int"),
    "num_decoder_layers": used("decoder layers", "int"),
    "num_heads": used("heads", "int"),
    "hidden_size": used("alias of d_model (attribute_map)", "int"),
    "num_attention_heads": used("alias of num_heads (attribute_map)", "int"),
    "num_hidden_layers": used("alias of num_layers (attribute_map)", "int"),
    "head_dim": used("alias of d_kv (attribute_map)", "int"),
    "relative_attention_num_buckets": used("relative position buckets", "int"),
    "relative_attention_max_distance": used("relative position distance", "int"),
    "layer_norm_epsilon": used("RMSNorm epsilon", "float"),
    "feed_forward_proj": used("relu, gated-gelu, ... (unsupported ones refused)", "str"),
    "dense_act_fn": ignored("transformers derives it from feed_forward_proj, overwriting the stored value"),
    "is_gated_act": ignored("transformers derives it from feed_forward_proj, overwriting the stored value"),
    "scale_decoder_outputs": used("scales the decoder output by d_model**-0.5 before a tied head", "bool"),
    "decoder_start_token_id": used("first decoder token", "int"),
    "dropout_rate": ignored(_DROPOUT),
    "classifier_dropout": ignored(_DROPOUT),
    "initializer_factor": ignored(_INIT),
    "is_decoder": refused("a decoder-only T5 stack", False),
}
BERT_CONFIG: dict[str, Field] = {
    **_COMMON,
    "hidden_size": used("D", "int"),
    "intermediate_size": used("MLP width", "int"),
    "num_hidden_layers": used("layers", "int"),
    "num_attention_heads": used("heads", "int"),
    "hidden_act": used("the feed-forward activation (one of jaxlm.models.layers ACTIVATIONS; others refused)", "str"),
    "max_position_embeddings": used("position table size", "int"),
    "type_vocab_size": used("token type table size", "int"),
    "layer_norm_eps": used("LayerNorm epsilon", "float"),
    "hidden_dropout_prob": ignored(_DROPOUT),
    "attention_probs_dropout_prob": ignored(_DROPOUT),
    "classifier_dropout": ignored(_DROPOUT),
    "position_embedding_type": refused("relative position embeddings (transformers 4)", "absolute"),
    "is_decoder": refused("causal BERT attention", False),
    "add_cross_attention": refused("cross-attention layers", False),
}
# transformers' attribute_map aliases (T5's hidden_size -> d_model, ...): the loader reads an alias
# when the canonical key is absent.
ALIASES: dict[str, dict[str, str]] = {
    "t5": {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
           "head_dim": "d_kv"},
}

TABLES: dict[str, dict[str, Field]] = {
    "generation_config.json": GENERATION_CONFIG,
    "adapter_config.json": ADAPTER_CONFIG,
    "gguf": GGUF,
    "LlamaConfig": LLAMA_CONFIG,
    "MistralConfig": MISTRAL_CONFIG,
    "T5Config": T5_CONFIG,
    "BertConfig": BERT_CONFIG,
}
# config.json `architectures` entry -> its table.
CONFIG_TABLES: dict[str, str] = {
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "T5ForConditionalGeneration": "T5Config",
    "BertModel": "BertConfig",
    "BertForMaskedLM": "BertConfig",
    "BertForPreTraining": "BertConfig",
}


def _type_ok(kind: str, value: Any) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        return is_int
    if kind == "float":
        return is_int or isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "ids":
        return is_int or isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    raise ValueError(f"unknown field kind {kind!r}")


def check_config(table: str, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check a parsed config.json against its table: types of used keys, refused keys, aliases.

    Args:
      table: a key of `TABLES` (see `CONFIG_TABLES`).
      values: the parsed config.json.
      source: the file, named in errors.

    Returns:
      `values` with transformers' attribute_map aliases (T5's hidden_size, ...) copied to their
      canonical key where that key is absent.

    Raises:
      CheckpointError: "<source>: field 'k' = v must be <kind>" for a used key of the wrong type (null
        is accepted: the loader's default applies), or a refused key (see `refuse`).
    """
    fields = TABLES[table]
    for key, value in values.items():
        field = fields.get(key)
        if field is not None and field.kind and value is not None and not _type_ok(field.kind, value):
            raise CheckpointError(f"{source}: field {key!r} = {value!r} must be {_KIND_NAMES[field.kind]}")
    refuse(table, values, source)
    out = dict(values)
    family = {"T5Config": "t5"}.get(table)
    for alias, canonical in ALIASES.get(family, {}).items():
        if alias in out and canonical not in out:
            out[canonical] = out[alias]
    return out


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "ids": "an integer or a list of integers"}


def gguf_template(key: str, arch: str) -> str:
    """A GGUF metadata key in the table's spelling: `llama.rope.freq_base` -> `{arch}.rope.freq_base`,
    `llama.dense_2_feat_in` -> `{arch}.{dense}_feat_in`, `tokenizer.chat_template.tool_use` ->
    `tokenizer.chat_template.{name}`, `general.base_model.0.name` -> `general.base_model.{id}.name`."""
    if key.startswith(arch + "."):
        rest = key[len(arch) + 1:]
        dense = re.fullmatch(r"\w+_feat_(in|out)", rest)  # {dense}_feat_in: named dense layers (embedding heads)
        return "{arch}." + ("{dense}_feat_" + dense.group(1) if dense else rest)
    if key.startswith("tokenizer.chat_template.") and key not in GGUF:
        return "tokenizer.chat_template.{name}"
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "general" and parts[2].isdigit():
        return f"general.{parts[1]}.{{id}}.{parts[3]}"
    return key


def refusals(table: str, values: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """The keys of `values` that `table` refuses and that are set to a non-neutral value.

    Args:
      table: a key of `TABLES`.
      values: the parsed file (key -> value).

    Returns:
      [(key, value, reason)] in the file's key order; unknown keys are not listed.
    """
    fields = TABLES[table]
    return [
        (k, v, fields[k].reason)
        for k, v in values.items()
        if k in fields and fields[k].status == REFUSED and not fields[k].accepts(v)
    ]


def refuse(table: str, values: Mapping[str, Any], source: str) -> None:
    """Raise when `values` sets a key that `table` refuses.

    Args:
      table: a key of `TABLES`.
      values: the parsed file.
      source: the file, named in the message.

    Raises:
      CheckpointError: "<source>: field 'k' = v is not supported (<reason>)" for the first refusal.
    """
    found = refusals(table, values)
    if found:
        key, value, reason = found[0]
        raise CheckpointError(f"{source}: field {key!r} = {value!r} is not supported ({reason})")
