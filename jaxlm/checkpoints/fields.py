"""Every key of the checkpoint formats jaxlm reads, marked used, ignored (with why) or refused.

One table per format (`TABLES`): Hugging Face `generation_config.json`, the `config.json` of each
supported architecture, PEFT's `adapter_config.json` and GGUF metadata. The loaders call `refuse`
with the parsed file, so a refused key set to anything but a neutral value fails in one line naming
the file and the key; `tests/test_config_keys.py` fails when the installed transformers / peft /
gguf know a key this table does not, so a new field surfaces the day a library adds it.
"""

from __future__ import annotations

import dataclasses
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
    """

    status: str
    reason: str = ""
    neutral: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        """True when a REFUSED key's `value` is None, empty or one of its neutral values."""
        return value is None or value == [] or value == {} or value in self.neutral


def used(reason: str = "") -> Field:
    return Field(USED, reason)


def ignored(reason: str) -> Field:
    return Field(IGNORED, reason)


def refused(reason: str, *neutral: Any) -> Field:
    return Field(REFUSED, reason, tuple(neutral))


_SAMPLING = "jaxlm generate decodes greedily (documented); a sampling setting never applies to it"
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
    "monteclora_config": refused("Monte Carlo LoRA sampling"),
    "kasa_config": refused("KaSA singular-value adaptation"),
    "velora_config": refused("VeLoRA"),
}

TABLES: dict[str, dict[str, Field]] = {
    "generation_config.json": GENERATION_CONFIG,
    "adapter_config.json": ADAPTER_CONFIG,
}


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
