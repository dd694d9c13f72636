"""The numpy batch layout shared by the data pipeline (producer) and training/eval (consumers).

Feature names follow t5x/seqio feature converters, so researchers recognise them. All arrays are
numpy with a leading batch axis B and a length axis padded to a bucket. Padding is 0 in every
feature; `*_loss_weights` are 0 on padding and on positions that are not targets.

Decoder-only (Llama family), one row = prompt + target (or packed passages):
  decoder_input_tokens   int32 (B, L)  the token ids fed to the model
  decoder_target_tokens  int32 (B, L)  next-token labels: decoder_input_tokens shifted left by one
  decoder_loss_weights   float32 (B, L) 1.0 where the label is a target token, else 0.0
  decoder_positions      int32 (B, L)  position ids (restart at 0 for each packed segment)
  decoder_segment_ids    int32 (B, L)  1.. per packed segment, 0 on padding (unpacked: 1 on real tokens)
Encoder-decoder (T5):
  encoder_input_tokens   int32 (B, Le)
  encoder_segment_ids    int32 (B, Le)  1 on real tokens (packing: 1.. per segment), 0 on padding
  decoder_input_tokens   int32 (B, Ld)  targets shifted right after the decoder start token
  decoder_target_tokens  int32 (B, Ld)
  decoder_loss_weights   float32 (B, Ld)
  decoder_segment_ids    int32 (B, Ld)
Optional, either layout:
  task_index             int32 (B,)    index of the example's task in the run's task list
                                       (selects a per-task LoRA teacher / a cached generated adapter)
TAGI (grouped batches, jaxlm/data/tagi_batches.py): G tasks x B/G examples; task_index then indexes G.
  instruction_tokens     int32 (G, T)  each task's instruction, read ONCE per task by the hypernetwork
  instruction_mask       int32 (G, T)  1 on instruction tokens, 0 on padding
  teacher_index          int32 (G,)    the task's adapter in a LoRA teachers stack, -1 = none
  teacher_*              the same example with the instruction in context (every decoder_* /
                         encoder_* name prefixed), read by the in-step KL teacher
  teacher_topk_ids / teacher_topk_logprobs (B, T, k), teacher_topk_valid (B, T)
                         a cached teacher's top-k log-probs at each row's t-th target token (.npz)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

DECODER_ONLY_FEATURES: tuple[str, ...] = (
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_positions", "decoder_segment_ids",
)
ENCODER_DECODER_FEATURES: tuple[str, ...] = (
    "encoder_input_tokens", "encoder_segment_ids",
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids",
)
OPTIONAL_FEATURES: tuple[str, ...] = ("task_index",)
TAGI_FEATURES: tuple[str, ...] = ("instruction_tokens", "instruction_mask", "teacher_index")
TEACHER_PREFIX = "teacher_"
TOPK_PREFIX = "teacher_topk_"


def teacher_view(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher rows of a TAGI batch under the plain feature names ({} when it has none)."""
    return {k[len(TEACHER_PREFIX):]: v for k, v in batch.items()
            if k.startswith(TEACHER_PREFIX) and not k.startswith(TOPK_PREFIX)}


def layout_of(batch: Mapping[str, np.ndarray]) -> str:
    """'decoder_only' or 'encoder_decoder', from which features the batch has."""
    return "encoder_decoder" if "encoder_input_tokens" in batch else "decoder_only"


def check_batch(batch: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming the missing feature or the inconsistent shape."""
    names = ENCODER_DECODER_FEATURES if layout_of(batch) == "encoder_decoder" else DECODER_ONLY_FEATURES
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"batch is missing features {missing} (has {sorted(batch)})")
    sizes = {n: np.shape(batch[n])[0] for n in batch if n not in TAGI_FEATURES}  # TAGI's are (G, ...)
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch features disagree on the batch size: {sizes}")
    for group in ("decoder", "encoder"):
        shapes = {n: np.shape(batch[n]) for n in names if n.startswith(group)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"{group} features disagree on shape: {shapes}")


class BatchIterator(Protocol):
    """What a training loop consumes: numpy batches in the layout above, with resumable state.

    Implementations (the seqio mixture pipeline in jaxlm/data/batches.py, synthetic batches in
    tests) must be deterministic given their seed, so that `restore(state())` on a fresh iterator
    yields exactly the batches the original would have yielded next. `state()` is JSON-serialisable
    (it is saved in every checkpoint). For multi-host runs an iterator is built per process with
    (shard_index=jax.process_index(), num_shards=jax.process_count()) and yields that process's
    rows of the global batch.
    """

    def __iter__(self) -> BatchIterator: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...
