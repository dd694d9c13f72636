"""A trained TAGI hypernetwork on disk, and using it: instructions -> LoRA adapters.

Layout of `DIR` (written by `TAGIDistillation.export` at the end of a run, `RUN/hypernet/`):
  hypernet.json          format, family, base_model_dir, the HypernetConfig, whether the instruction
                         encoder was trained, how instructions are tokenized (`instruction.codec`:
                         "bytes" or the base tokenizer) and the prompt formats used in training
  hypernet.safetensors   the trainable params, keys "hypernet/<path>" (and "encoder/<path>")
  base/                  the base model as a HF dir (written when it came from GGUF or was trained
                         here); otherwise base_model_dir is the absolute path of the HF dir trained on
Tensors are safetensors, never JSON. `load_hypernet(path)` accepts DIR, a run dir, or a two-stage run
dir; `H.adapters(instructions)` runs the hypernetwork once per instruction (one jitted batched pass)
and returns a LoraWeights with a leading instruction axis; `H.export_adapter(instruction, out)`
writes a PEFT adapter whose `base_model_name_or_path` is the base HF dir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import jsonl
from jaxlm.buckets import DEFAULT_LENGTH_BUCKETS, bucket_length, pad_rows
from jaxlm.checkpoints.hf import CheckpointError, flatten, unflatten
from jaxlm.checkpoints.pretrained import Pretrained, export_hf, load_pretrained
from jaxlm.files import write_dir_atomically
from jaxlm.models.lora import LoraSpec, LoraWeights

HYPERNET_CONFIG = "hypernet.json"
PARAMS_FILE = "hypernet.safetensors"
FORMAT = 1


def hypernet_metadata(objective: Any) -> dict[str, Any]:
    """What `load_hypernet` needs besides params: the hypernet config and how instructions are read.

    Args:
      objective: a `jaxlm.train.tagi.TAGIDistillation` (read for `hypernet`, `spec`, `train_encoder`,
        `instruction_codec`, `teacher_format`, `student_format`).

    Returns:
      A JSON-ready dict with keys "hypernet", "train_encoder", "instruction".
    """
    cfg = dataclasses.asdict(objective.hypernet)
    cfg["lora"] = {"targets": list(objective.spec.targets), "rank": objective.spec.rank, "alpha": objective.spec.alpha}
    return {
        "hypernet": cfg,
        "train_encoder": objective.train_encoder,
        "instruction": {"codec": objective.instruction_codec, "teacher_format": objective.teacher_format,
                        "student_format": objective.student_format},
    }


def find_hypernet_dir(path: str | Path, missing_ok: bool = False) -> Path | None:
    """A hypernet export dir from a path to it, to a run dir (`hypernet/`), or to a TAGI pipeline run
    dir (`stage2/hypernet/`, else `stage1/hypernet/`).

    Raises:
      CheckpointError: none of those holds a hypernet.json (unless `missing_ok`: then None).
    """
    root = Path(path)
    for candidate in (root, root / "hypernet", root / "stage2" / "hypernet", root / "stage1" / "hypernet"):
        if (candidate / HYPERNET_CONFIG).is_file():
            return candidate
    if missing_ok:
        return None
    raise CheckpointError(f"{path}: no {HYPERNET_CONFIG} in it, its hypernet/ or stage2/hypernet/ "
                          "(pass the workdir of a finished TAGI run)")


def save_hypernet(directory: str | Path, objective: Any, trainable: Any, frozen: Any) -> Path:
    """Write DIR atomically (temp dir renamed into place) from a `TAGIDistillation` and its params."""
    from safetensors.numpy import save_file

    tensors = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(trainable).items()}
    source = Path(objective.pretrained) if objective.pretrained else None
    keep_source = source is not None and source.is_dir()  # a HF dir: point at it, do not copy
    meta = {"format": FORMAT, "family": objective.config.family,
            "base_model_dir": str(source.resolve()) if keep_source else "base",
            "base_source": objective.pretrained or "random-init", **hypernet_metadata(objective)}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / PARAMS_FILE))
        if not keep_source:
            export_hf(objective.export_target(frozen["base"]), tmp / "base", params=frozen["base"])
        (tmp / HYPERNET_CONFIG).write_text(jsonl.dumps(meta, indent=2, sort_keys=True))

    return write_dir_atomically(directory, fill)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / HYPERNET_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a hypernetwork directory)")
    meta = json.loads(file.read_text())
    for key in ("format", "family", "base_model_dir", "hypernet", "instruction"):
        if key not in meta:
            raise CheckpointError(f"{file}: field {key!r} is missing")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{file}: format {meta['format']} is not supported (expected {FORMAT})")
    return meta


def read_params(directory: str | Path) -> dict[str, Any]:
    """{"hypernet": tree, ["encoder": tree]} as numpy, from hypernet.safetensors."""
    from safetensors.numpy import load_file

    file = Path(directory) / PARAMS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a hypernetwork directory)")
    return unflatten({tuple(k.split("/")): v for k, v in load_file(str(file)).items()})


def hypernet_config(meta: dict[str, Any]) -> Any:
    from jaxlm.models.hypernet import HypernetConfig

    fields = dict(meta["hypernet"])
    fields.setdefault("head_scaling", "none")  # written before the field existed: version one's heads
    fields.setdefault("encoder_layer", None)
    lora = fields.pop("lora")
    return HypernetConfig(lora=LoraSpec(tuple(lora["targets"]), int(lora["rank"]), float(lora["alpha"])), **fields)


@dataclasses.dataclass
class Hypernet:
    """A loaded hypernetwork: `base` (the Pretrained it adapts), `adapters(instructions)`."""

    base: Pretrained
    directory: Path
    meta: dict[str, Any]
    params: dict[str, Any]
    batch_size: int = 8

    def __post_init__(self) -> None:
        from jaxlm.checkpoints.instruction_codec import text_codec
        from jaxlm.models import hypernet as hyper_lib
        from jaxlm.models.lora import unbox

        self.config = hypernet_config(self.meta)
        self.slots = hyper_lib.lora_slots(unbox(self.base.params), self.config.lora)
        self.module = hyper_lib.HyperLoRA(self.config, self.slots)
        spec = self.meta["instruction"]["codec"]
        if self.config.encoder == "minilm":
            encoder = load_pretrained("all-minilm-l6-v2")
            self.codec = text_codec("all-minilm-l6-v2", tokenizer=encoder.tokenizer)
        else:
            encoder = self.base
            self.codec = text_codec(spec, tokenizer=None if spec == "bytes" else self.base.tokenizer)
        self._encoder_params = self.params.get("encoder", encoder.params)
        self._encoder_positions = getattr(encoder.config, "max_position_embeddings", None)
        kind, model, module, layer = self.config.encoder, encoder.model, self.module, self.config.encoder_layer
        fusion = self.config.fusion and self.meta["family"] == "t5"
        self._t5_fusion = fusion

        def run(encoder_params, hyper_params, ids, mask):  # params as arguments: never baked into the jit
            h = hyper_lib.encode_instruction(kind, model, encoder_params, ids, mask, layer)
            return module.apply({"params": hyper_params}, h, mask, with_fusion=fusion)

        self._run = jax.jit(run)

    @property
    def instruction_format(self) -> dict[str, str]:
        """How training built prompts: {"codec", "teacher_format", "student_format"}."""
        return dict(self.meta["instruction"])

    @property
    def prefix_fusion(self) -> bool:
        """True for decoder-only fusion: the adapted model reads `tokenize(instruction)` as a prefix of
        every prompt (`jaxlm.models.prefix`), as in training."""
        return self.config.fusion and self.meta["family"] == "llama"

    @property
    def max_instruction_tokens(self) -> int:
        """The longest instruction the hypernetwork reads, in codec tokens: the instruction encoder's
        positions (max_position_embeddings), or for T5 (relative positions, no limit) the largest default
        length bucket, 2048. (The training data's own cut, tagi_data.max_instruction_len, is not
        recorded in hypernet.json.)"""
        return int(self._encoder_positions or DEFAULT_LENGTH_BUCKETS[-1])

    def tokenize(self, instruction: str, max_tokens: int | None = None) -> list[int]:
        """The codec ids of `instruction`, the first ones kept, as training cuts them.

        Args:
          instruction: the instruction text.
          max_tokens: the cut; None = `max_instruction_tokens`. Pass the training data's own cut
            (tagi_data.max_instruction_len) when it was shorter, so the hypernetwork (and a fusion
            prefix) reads what it was trained on.

        Returns:
          At most min(max_tokens, max_instruction_tokens) token ids.

        Raises:
          ValueError: the instruction encodes to no tokens, or max_tokens < 1.
        """
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self.codec.encode(instruction)
        if not ids:
            raise ValueError("empty instruction")
        return ids[: min(self.max_instruction_tokens, max_tokens or self.max_instruction_tokens)]

    def adapters(self, instructions: Sequence[str], max_tokens: int | None = None) -> LoraWeights:
        """One adapter per instruction: the hypernetwork runs once per instruction, in padded batches
        of `batch_size` (bucketed lengths: a few compiled shapes).

        Args:
          instructions: N instruction texts (what `instruction_for` builds, as in training).
          max_tokens: each instruction's cut, see `tokenize`.

        Returns:
          LoraWeights with numpy leaves (N, D_in, r) / (N, r, D_out), the spec's rank and alpha.

        Raises:
          ValueError: no instructions, or an instruction that encodes to no tokens.
        """
        return self.emit_lora(instructions, max_tokens)[0]

    def emit_lora(self, instructions: Sequence[str], max_tokens: int | None = None) -> tuple[LoraWeights, Any]:
        """`adapters`, plus the fused instruction states of encoder-decoder fusion.

        Args:
          instructions, max_tokens: as `adapters`.

        Returns:
          (LoraWeights with leaves (N, ...), a list of per-batch float32 state arrays (n, T, D) for T5
          fusion, else None).

        Raises:
          ValueError: as `adapters`.
        """
        if not instructions:
            raise ValueError("adapters() needs at least one instruction")
        rows = [self.tokenize(t, max_tokens) for t in instructions]
        loras, fused = [], []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[0]] * (self.batch_size - n)
            width = bucket_length(max(map(len, chunk)), DEFAULT_LENGTH_BUCKETS)
            ids, mask = pad_rows(chunk, width, 0)
            out = self._run(self._encoder_params, self.params["hypernet"], jnp.asarray(ids), jnp.asarray(mask))
            lora, f = out if self._t5_fusion else (out, None)
            loras.append(jax.tree_util.tree_map(lambda x, n=n: np.asarray(x[:n]), lora.params))
            if f is not None:
                fused.append(np.asarray(f[:n]))
        params = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *loras)
        return LoraWeights(params, self.config.lora.rank, self.config.lora.alpha), (fused or None)

    @property
    def base_model_dir(self) -> Path:
        d = Path(self.meta["base_model_dir"])
        return d if d.is_absolute() else (self.directory / d).resolve()

    def export_adapter(self, instruction: str, output: str | Path) -> Path:
        """A PEFT adapter dir for `instruction` (base_model_name_or_path = the base HF dir)."""
        from jaxlm.checkpoints.peft import export_peft_adapter
        from jaxlm.models.lora import select

        if self.config.fusion:
            how = ("the instruction's tokens read as a prefix of every prompt" if self.prefix_fusion
                   else "the fused instruction states")
            raise CheckpointError(f"{self.directory}: a hypernetwork trained with instruction fusion "
                                  f"(hypernet.json hypernet.fusion) needs {how} at inference; a plain PEFT adapter "
                                  "cannot carry them (evaluate it with jaxlm.eval.rewrite.RewriteEval or "
                                  "Hypernet.emit_lora + Hypernet.tokenize)")
        return export_peft_adapter(select(self.adapters([instruction]), 0), self.base, output,
                                   base_model_name_or_path=str(self.base_model_dir))


@functools.lru_cache(maxsize=2)
def _load(directory: str) -> Hypernet:
    meta = read_metadata(directory)
    d = Path(directory)
    base_dir = Path(meta["base_model_dir"])
    base_dir = base_dir if base_dir.is_absolute() else d / base_dir
    if not base_dir.is_dir():
        raise CheckpointError(f"{d / HYPERNET_CONFIG}: base_model_dir {str(base_dir)!r} does not exist")
    return Hypernet(load_pretrained(base_dir), d, meta, read_params(d))


def load_hypernet(path: str | Path) -> Hypernet:
    """The hypernetwork of DIR, of a run dir (RUN/hypernet) or of a TAGI pipeline run (RUN/stage2/hypernet)."""
    return _load(str(find_hypernet_dir(path).resolve()))
