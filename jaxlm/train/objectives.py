"""Objectives: a model, what of it trains, and the pure loss, bundled so one TrainStep serves them all.

  CausalLM      a Llama-family decoder, full finetune (`lora=None`) or a LoRA (`lora=LoraSpec(...)`)
  Seq2SeqLM     a T5 encoder-decoder, full finetune or LoRA
  LoRATeachers  N per-task LoRA adapters of one frozen base trained in ONE run: the adapters are
                stacked on a leading task axis and each example picks its own through
                `batch["task_index"]` and the batched-LoRA path of `jaxlm.models.lora`
                (one jitted step for a mixed-task batch; no per-example d x d kernel).

Pytrees never mix: `init` returns (trainable, frozen); with LoRA the frozen tree is the base model
and the trainable tree is the plain LoRA param dict (rank/alpha are static fields of the objective).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import gin
import jax
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

from jaxlm.checkpoints.hf import FLOAT_DTYPES
from jaxlm.checkpoints.pretrained import (
    Pretrained,
    abstract_params,
    family,
    load_pretrained,
)
from jaxlm.errors import ConfigError
from jaxlm.models import lora as lora_lib
from jaxlm.models.lora import LoraSpec, LoraWeights
from jaxlm.train import losses

Array = jax.Array
PyTree = Any


class Objective(Protocol):
    """What `TrainStep` trains: params split into a trainable and a frozen pytree, and a pure loss.

    An objective whose frozen parts are read from disk also has `pretrained_base(mesh=None,
    abstract=False)` (the parts, placed on `mesh` as they are read, or their ShapeDtypeStructs),
    `base_logical_axes()` (their logical axes) and `init(rng, base)` (built from them); see
    `LanguageModel`. TrainStep then reads the shapes without weights and the weights onto its mesh.
    """

    def init(self, rng: Array) -> tuple[PyTree, PyTree]:
        """(trainable, frozen) params; must work under `jax.eval_shape`.

        Args:
          rng: a PRNG key.

        Returns:
          (trainable, frozen): plain (unboxed) param pytrees; the optimizer sees only `trainable`.
        """

    def logical_axes(self) -> tuple[PyTree, PyTree]:
        """Logical PartitionSpecs matching (trainable, frozen).

        Returns:
          Two trees of `PartitionSpec`s of logical axis names (mapped onto the mesh by
          `jaxlm.sharding`), with the structures `init` returns.
        """

    def loss(self, trainable: PyTree, frozen: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, dict]:
        """(token-weighted mean loss of `batch`, scalar metrics); pure.

        Args:
          trainable: the trainable params (differentiated).
          frozen: the frozen params.
          batch: the features of `jaxlm.features` (B rows, padded lengths).
          rng: a PRNG key for stochastic losses.

        Returns:
          (loss, metrics): a float32 scalar and {name: float32 scalar}.
        """


@functools.lru_cache(maxsize=4)
def _load_pretrained_cached(name: str) -> Pretrained:
    """One host load per process, for small frozen parts kept on host (TAGI's MiniLM encoder)."""
    return load_pretrained(name)


@functools.lru_cache(maxsize=8)
def describe_pretrained(name: str, param_dtype: str = "float32") -> Pretrained:
    """A checkpoint without its weights, once per process: config, tokenizer, generation config and
    the abstract params (`jax.ShapeDtypeStruct`s in `param_dtype`); no tensor is read.

    Args:
      name: a HF directory, a .gguf file or a weight-package name.
      param_dtype: the dtype the params would be held in.

    Returns:
      The `Pretrained` of `load_pretrained(name, param_dtype=param_dtype, weights=False)`.

    Raises:
      CheckpointError: `name` cannot be resolved or its config/tokenizer read.
    """
    return load_pretrained(name, param_dtype=param_dtype, weights=False)


def read_pretrained_params(name: str, param_dtype: str = "float32", mesh: Mesh | None = None,
                           abstract: bool = False) -> PyTree:
    """The params of a checkpoint, read now (never cached: a trained run holds one copy, on its devices).

    Args:
      name: a HF directory, a .gguf file or a weight-package name.
      param_dtype: the params' dtype.
      mesh: place each tensor on its shards of this mesh as it is read (the whole tree never exists
        on one host); None: arrays on the default device.
      abstract: return the `jax.ShapeDtypeStruct` tree instead (nothing read).

    Returns:
      The plain param tree.

    Raises:
      CheckpointError: a tensor is missing, misshapen or unreadable (named).
    """
    if abstract:
        return describe_pretrained(name, param_dtype).params
    return load_pretrained(name, param_dtype=param_dtype, mesh=mesh).params


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Shared machinery of the LM objectives: the base model (random init from `model_config`, or the
    weights of `pretrained`: a HF dir, a .gguf file or an installed package name) and an optional LoRA.

    `compute_dtype` overrides the model config's activation dtype; `param_dtype` the dtype params are
    held and trained in (a pretrained base is read into it tensor by tensor; None: float32 for a
    pretrained base, the `model_config`'s for a random init).
    `context_across_rows` (decoder-only, packed batches): attend causally across packed rows with
    positions running over the whole sequence, GPT-style, instead of block-diagonal per row; every row
    then follows solved rows of other tasks, so the model learns to read cross-task demonstrations
    (the ICIL-style prompt of the rewrite study). Padding stays masked.
    """

    model_config: Any = None
    pretrained: str | None = None
    lora: LoraSpec | None = None
    compute_dtype: str | None = None
    param_dtype: str | None = None
    init_seed: int | None = None  # base params seed when not pretrained (default: the run's rng)
    context_across_rows: bool = False

    expected_family = None  # "llama" / "t5" in subclasses
    end_of_run_export = None  # subdirectory the loop exports into when a run ends (None: on request only)

    def __post_init__(self) -> None:
        if (self.model_config is None) == (self.pretrained is None):
            raise ConfigError(f"{type(self).__name__}: set exactly one of model_config and pretrained")
        if self.param_dtype not in (None, *FLOAT_DTYPES):
            raise ConfigError(f"{type(self).__name__}.param_dtype = {self.param_dtype!r}: expected one of {FLOAT_DTYPES}")
        fam = self.config.family
        if self.expected_family and fam != self.expected_family:
            raise ConfigError(f"{type(self).__name__} trains a {self.expected_family} model, got a {fam} model")

    # ---------------------------------------------------------------- model
    @property
    def base(self) -> Pretrained | None:
        """The `pretrained` checkpoint without its weights (`describe_pretrained`: config, tokenizer,
        abstract params; read once per process), or None with `model_config`.

        Raises:
          CheckpointError: `pretrained` cannot be resolved or read.
        """
        return describe_pretrained(self.pretrained, self.param_dtype or "float32") if self.pretrained else None

    @property
    def config(self) -> Any:
        """The model config (`model_config` or the checkpoint's), with `compute_dtype` as its dtype and
        `param_dtype` as its param_dtype when set."""
        config = self.base.config if self.pretrained else self.model_config
        if self.param_dtype:
            config = dataclasses.replace(config, param_dtype=self.param_dtype)
        return dataclasses.replace(config, dtype=self.compute_dtype) if self.compute_dtype else config

    @property
    def model(self) -> nn.Module:
        """A fresh Flax module of the config's family (`Llama`, `T5`, ...) built from `config`."""
        return family(self.config.family).module(self.config)

    def with_compute_dtype(self, dtype: str) -> LanguageModel:
        """A copy of this objective with `compute_dtype=dtype` (e.g. "bfloat16").

        Args:
          dtype: activation dtype name.

        Returns:
          A new objective of the same class; params are unaffected (they keep `param_dtype`).
        """
        return dataclasses.replace(self, compute_dtype=dtype)

    def with_param_dtype(self, dtype: str) -> LanguageModel:
        """A copy of this objective with `param_dtype=dtype` (params held and trained in it).

        Args:
          dtype: one of `FLOAT_DTYPES`.

        Returns:
          A new objective of the same class.

        Raises:
          ConfigError: `dtype` is not one of `FLOAT_DTYPES`.
        """
        return dataclasses.replace(self, param_dtype=dtype)

    def pretrained_base(self, mesh: Mesh | None = None, abstract: bool = False) -> PyTree | None:
        """The pretrained base's params, read from disk now (TrainStep passes them to the jitted init,
        never baking them in as constants).

        Args:
          mesh: place each tensor on its shards of this mesh as it is read (`load_pretrained(mesh=)`),
            so the whole base never exists on one host; None: arrays on the default device.
          abstract: the `jax.ShapeDtypeStruct`s instead (nothing read; for `jax.eval_shape`).

        Returns:
          The checkpoint's plain param tree in `param_dtype`, arrays read for this call and held by
          nothing else (TrainStep's init consumes them), or None when the base is randomly initialised.

        Raises:
          CheckpointError: a tensor is missing, misshapen or unreadable (named).
        """
        if not self.pretrained:
            return None
        return read_pretrained_params(self.pretrained, self.param_dtype or "float32", mesh, abstract)

    def export_target(self, frozen: PyTree) -> Pretrained:
        """The `Pretrained` an adapter of this run is exported against (PEFT names, base path).

        Args:
          frozen: the params to export with: the base params (LoRA) or the full trained params.

        Returns:
          The checkpoint's config, tokenizer and source holding `frozen`, or a tokenizer-less
          `Pretrained` with source "random-init" holding `frozen`.
        """
        if self.pretrained:
            return dataclasses.replace(self.base, params=frozen)
        return Pretrained(self.config.family, self.config, frozen, None, "random-init")

    def export(self, output: str | Path, trainable: PyTree, frozen: PyTree, *, merged: bool = False,
               base_model_name_or_path: str | None = None, dtype: str = "float32") -> Path:
        """Write the trained model where transformers / peft read it.

        Args:
          output: the directory to write (atomically).
          trainable: the trained params (the full model, or the LoRA param dict).
          frozen: the frozen params (the base model under LoRA, else {}).
          merged: with LoRA, fold the adapter into the base kernels and write a plain HF directory.
          base_model_name_or_path: with LoRA, the base the adapter names instead (e.g. a weight-package
            name `jaxlm --model` resolves); then no base is written beside the adapter.
          dtype: the written tensors' dtype (one of `FLOAT_DTYPES`): the model, the adapter and a
            base written beside it.

        Returns:
          `output`: a HF directory (config.json, model.safetensors, tokenizer when the base has one)
          for a full finetune or `merged=True`; a PEFT directory (adapter_config.json,
          adapter_model.safetensors) for LoRA. Its `base_model_name_or_path` is the pretrained base's
          directory; a base that is not a HF directory on disk (random init, GGUF, a weight package
          resolves to its HF dir) is written beside the adapter as `output/base/` and named instead.

        Raises:
          ConfigError: `merged=True` without LoRA.
          ValueError: `dtype` is not one of `FLOAT_DTYPES`.
        """
        from jaxlm.checkpoints.peft import export_peft_adapter
        from jaxlm.checkpoints.pretrained import export_hf

        output = Path(output)  # device arrays are gathered to host tensor by tensor as they are written
        if self.lora is None:
            if merged:
                raise ConfigError(f"{type(self).__name__}: merged=True needs a LoRA run (this is a full finetune)")
            return export_hf(self.export_target(trainable), output, params=trainable, dtype=dtype)
        lora = LoraWeights(trainable, self.lora.rank, self.lora.alpha)
        target = self.export_target(frozen)
        if merged:
            return export_hf(target, output, params=lora_lib.merge(frozen, lora), dtype=dtype)
        if base_model_name_or_path is not None:
            return export_peft_adapter(lora, target, output, base_model_name_or_path=base_model_name_or_path,
                                       dtype=dtype)
        base_dir = self._base_dir()
        written_base = base_dir is None
        if written_base:
            base_dir = (output / "base").resolve()
        export_peft_adapter(lora, target, output, base_model_name_or_path=str(base_dir), dtype=dtype)
        if written_base:
            export_hf(target, base_dir, params=frozen, dtype=dtype)
        return output

    def _base_dir(self) -> Path | None:
        """The pretrained base's HF directory on disk, or None (random init, GGUF)."""
        if not self.pretrained:
            return None
        from jaxlm.checkpoints.pretrained import resolve_path

        path = resolve_path(self.pretrained)
        return path.resolve() if path.is_dir() else None

    # ---------------------------------------------------------------- params
    @property
    def num_adapters(self) -> int | None:
        """N stacked adapters trained at once, or None for a single adapter / full finetune."""
        return None

    def init(self, rng: Array, base: PyTree | None = None) -> tuple[PyTree, PyTree]:
        """(trainable, frozen) params; works under `jax.eval_shape`.

        Args:
          rng: a PRNG key, split into the base init's key (replaced by PRNGKey(init_seed) when set) and
            the LoRA A init's key.
          base: base params to use as they are (TrainStep passes `pretrained_base(mesh)`, placed on
            the mesh tensor by tensor, or its abstract form under `jax.eval_shape`); None: the
            checkpoint's params read now, or a random init from `model_config`.

        Returns:
          Full finetune: (base params, {}). LoRA: (the LoRA param dict, leaves (D_in, r) / (r, D_out), or
          (N, D_in, r) / (N, r, D_out) with `num_adapters` = N; the base params).

        Raises:
          ValueError: the LoRA targets match no module of the base.
        """
        rng_base, rng_lora = jax.random.split(rng)
        if self.init_seed is not None:
            rng_base = jax.random.PRNGKey(self.init_seed)
        if base is None:
            if self.pretrained:
                base = self.pretrained_base()
            else:
                fam = family(self.config.family)
                base = nn.unbox(self.model.init(rng_base, *fam.init_args(self.config))["params"])
        if self.lora is None:
            return base, {}
        adapter = lora_lib.init_lora(self.lora, base, rng_lora, batch_size=self.num_adapters)
        return adapter.params, base

    def base_logical_axes(self) -> PyTree:
        """Logical PartitionSpecs of the base model's params (also of `pretrained_base()`)."""
        return nn.get_partition_spec(abstract_params(self.config.family, self.config))

    def logical_axes(self) -> tuple[PyTree, PyTree]:
        """Logical PartitionSpecs matching `init`'s (trainable, frozen).

        Returns:
          Full finetune: (base axes, {}). LoRA: (LoRA axes, base axes), where A is (kernel in-axis,
          'lora_rank') and B ('lora_rank', kernel out-axis); stacked adapters get a leading None
          (the task axis is replicated, not split like a batch).
        """
        base_axes = self.base_logical_axes()
        if self.lora is None:
            return base_axes, {}
        abstract_base = nn.unbox(abstract_params(self.config.family, self.config))
        abstract_lora = jax.eval_shape(
            lambda: lora_lib.init_lora(self.lora, abstract_base, batch_size=self.num_adapters).params
        )
        axes = lora_lib.lora_logical_axes(LoraWeights(abstract_lora, self.lora.rank, self.lora.alpha), base_axes)
        if self.num_adapters is not None:  # a task axis, not the batch: keep every adapter on every device
            axes = jax.tree_util.tree_map(
                lambda s: PartitionSpec(None, *tuple(s)[1:]), axes, is_leaf=lambda x: isinstance(x, PartitionSpec)
            )
        return axes, base_axes

    # ---------------------------------------------------------------- loss
    def adapter(self, trainable: PyTree, batch: Mapping[str, Array]) -> LoraWeights | None:
        """The LoRA the model runs with for `batch`.

        Args:
          trainable: the trainable params (the LoRA param dict under LoRA).
          batch: the batch (unused here; `LoRATeachers` reads `task_index`).

        Returns:
          LoraWeights of `trainable` with the spec's rank and alpha, or None for a full finetune.
        """
        if self.lora is None:
            return None
        return LoraWeights(trainable, self.lora.rank, self.lora.alpha)

    def logits(self, params: PyTree, batch: Mapping[str, Array], lora: LoraWeights | None) -> Array:
        """Teacher-forced logits of a batch.

        T5 reads `encoder_input_tokens` and `decoder_input_tokens` (masks from the optional
        `*_segment_ids`, else all real). Llama reads `decoder_input_tokens` and the optional
        `decoder_positions` / `decoder_segment_ids` (block-diagonal packed rows), or, with
        `context_across_rows`, attends causally over the whole row with `decoder_segment_ids > 0` as mask.

        Args:
          params: the base model's params.
          batch: the features of `jaxlm.features`.
          lora: None, one adapter, or one per row (leaves (B, ...)).

        Returns:
          float32 logits (B, L, V) (T5: (B, Ld, V)).

        Raises:
          KeyError: a required feature is missing.
          ValueError: a batched LoRA whose adapter count differs from B.
        """
        if self.config.family == "t5":
            return self.model.apply(
                {"params": params}, batch["encoder_input_tokens"], None, batch["decoder_input_tokens"], None,
                lora=lora, encoder_segment_ids=batch.get("encoder_segment_ids"),
                decoder_segment_ids=batch.get("decoder_segment_ids"),
            )
        segments = batch.get("decoder_segment_ids")
        if self.context_across_rows and segments is not None:
            return self.model.apply({"params": params}, batch["decoder_input_tokens"], segments > 0, None, lora=lora)
        return self.model.apply(
            {"params": params}, batch["decoder_input_tokens"], None, batch.get("decoder_positions"),
            lora=lora, segment_ids=segments,
        )

    def loss(self, trainable: PyTree, frozen: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, dict]:
        """Cross-entropy of `decoder_target_tokens` weighted by `decoder_loss_weights`.

        Args:
          trainable: the full params, or the LoRA param dict.
          frozen: {} for a full finetune, else the base params.
          batch: the features of `jaxlm.features`.
          rng: unused (no dropout).

        Returns:
          (float32 token-weighted mean NLL in nats per target token, {'accuracy': token-weighted argmax
          accuracy}); both 0 for a batch without target tokens.

        Raises:
          KeyError: a required feature is missing.
        """
        del rng  # no dropout in these models
        params = trainable if self.lora is None else frozen
        logits_BxLxV = self.logits(params, batch, self.adapter(trainable, batch))
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        total, weight = losses.weighted_cross_entropy(logits_BxLxV, targets, weights)
        hits, _ = losses.token_accuracy(logits_BxLxV, targets, weights)
        return losses.safe_mean(total, weight), {"accuracy": losses.safe_mean(hits, weight)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CausalLM(LanguageModel):
    """Next-token cross-entropy of a Llama-family decoder on `decoder_*` features.

    Full finetune with `lora=None`, else a LoRA of the frozen base; see `LanguageModel`.

    Raises:
      ConfigError: at construction, when not exactly one of `model_config` and `pretrained` is set, or
        the model is not of the llama family.
    """

    expected_family = "llama"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Seq2SeqLM(LanguageModel):
    """Target cross-entropy of a T5 encoder-decoder on `encoder_*` / `decoder_*` features.

    Full finetune with `lora=None`, else a LoRA of the frozen base; see `LanguageModel`.

    Raises:
      ConfigError: at construction, when not exactly one of `model_config` and `pretrained` is set, or
        the model is not of the t5 family.
    """

    expected_family = "t5"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoRATeachers(LanguageModel):
    """`num_tasks` LoRA teachers of one frozen base, trained together; example b uses adapter
    `batch['task_index'][b]`. `task_names` (optional) names the exported adapter directories.

    The trainable tree is the stacked LoRA param dict, leaves (num_tasks, D_in, r) / (num_tasks, r, D_out).

    Attributes:
      num_tasks: N, the number of adapters.
      task_names: N names (exported directory names), or None for task_0 ... task_{N-1}.

    Raises:
      ConfigError: at construction, when `lora` is unset, `num_tasks` <= 0, `task_names` has the wrong
        length, or as `LanguageModel` (model_config / pretrained).
    """

    num_tasks: int = 1
    task_names: tuple[str, ...] | None = None

    end_of_run_export = "teachers"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora is None:
            raise ConfigError("LoRATeachers.lora: a LoraSpec is required (teachers are LoRA adapters)")
        if self.num_tasks <= 0:
            raise ConfigError(f"LoRATeachers.num_tasks must be positive, got {self.num_tasks}")
        if self.task_names is not None and len(self.task_names) != self.num_tasks:
            raise ConfigError(
                f"LoRATeachers.task_names has {len(self.task_names)} names for num_tasks={self.num_tasks}"
            )

    @property
    def num_adapters(self) -> int:
        """N = `num_tasks`."""
        return self.num_tasks

    def adapter(self, trainable: PyTree, batch: Mapping[str, Array]) -> LoraWeights:
        """Each example's teacher, gathered from the stack by `batch['task_index']`.

        Args:
          trainable: the stacked LoRA params, leaves (N, ...).
          batch: a batch with `task_index` int (B,) in [0, N).

        Returns:
          LoraWeights with leaves (B, D_in, r) / (B, r, D_out).

        Raises:
          ValueError: the batch has no `task_index`.
        """
        if "task_index" not in batch:
            raise ValueError("LoRATeachers needs batch['task_index'] (the task of each example)")
        return lora_lib.per_example(LoraWeights(trainable, self.lora.rank, self.lora.alpha), batch["task_index"])

    def save_teachers(
        self, directory: str | Path, trainable: PyTree, task_names: Sequence[str] | None, pretrained: Pretrained,
        dtype: str = "float32",
    ) -> Path:
        """Each teacher as a PEFT adapter dir `directory/<task name>` plus a `teachers.json` index.

        Args:
          directory: the output directory.
          trainable: the stacked LoRA params, leaves (N, ...).
          task_names: N names, or None for `self.task_names` (else task_0 ... task_{N-1}).
          pretrained: the base the adapters belong to (PEFT module names, recorded base source).
          dtype: the adapters' stored dtype (one of `FLOAT_DTYPES`).

        Returns:
          `directory`.

        Raises:
          ConfigError: the number of names differs from `num_tasks`.
        """
        from jaxlm.checkpoints.peft import export_peft_adapter
        from jaxlm.checkpoints.teachers import write_teachers_index

        names = list(task_names or self.task_names or [f"task_{i}" for i in range(self.num_tasks)])
        if len(names) != self.num_tasks:
            raise ConfigError(f"save_teachers: {len(names)} task names for {self.num_tasks} teachers")
        directory = Path(directory)
        stacked = LoraWeights(jax.device_get(trainable), self.lora.rank, self.lora.alpha)
        entries = []
        for index, name in enumerate(names):
            export_peft_adapter(lora_lib.select(stacked, index), pretrained, directory / name, dtype=dtype)
            entries.append({"task": name, "task_index": index, "adapter": name})
        write_teachers_index(directory, entries, base=pretrained.source, rank=self.lora.rank, alpha=self.lora.alpha)
        return directory

    def export(self, output: str | Path, trainable: PyTree, frozen: PyTree, *, merged: bool = False,
               dtype: str = "float32") -> Path:
        """The teachers as a LoRATeachers directory at `output` (what the loop writes to RUN/teachers/).

        Args:
          output: the directory to write.
          trainable: the stacked LoRA params.
          frozen: the base params (used when the base is not a pretrained checkpoint).
          merged: must be False.
          dtype: the adapters' stored dtype (one of `FLOAT_DTYPES`).

        Returns:
          `output`, written by `save_teachers` with the configured task names.

        Raises:
          ConfigError: `merged=True`.
        """
        if merged:
            raise ConfigError("LoRATeachers: merged=True is not defined for a stack of per-task adapters")
        return self.save_teachers(output, trainable, None, self.export_target(frozen), dtype)
