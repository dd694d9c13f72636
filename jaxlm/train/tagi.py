"""TAGI training: a hypernetwork emits LoRA from instructions, distilled from teachers; two stages.

`TAGIDistillation` is an `Objective` (jaxlm/train/objectives.py), so `jaxlm.train.loop.train` and
`TrainStep` run it unchanged (sharded, jitted, resumable). Pytrees never mix:
  trainable  {"hypernet": HyperLoRA params} (+ {"encoder": instruction-encoder params} when
             `train_encoder`: a copy of the base, or MiniLM);
  frozen     {"base": base LM} (+ "teachers": the stacked per-task LoRA teachers of a `LoRATeachers`
             directory, + "kl_teacher": another LM as KL teacher, + "encoder": a frozen MiniLM).
A batch (jaxlm/data/tagi_batches.py) holds G tasks x B/G examples; the hypernetwork reads each task's
instruction ONCE ((G, T) -> LoRA leaves (G, ...)), then every example gathers its task's adapter.

Loss = w_ce L_ce + w_kl L_kl + w_ins L_ins (each logged, every weight a gin binding):
  L_ce   labels cross-entropy of the student: the input WITHOUT the instruction + the generated LoRA;
  L_kl   KL(teacher || student) at temperature T (x T^2), the teacher being the base LM (or
         `teacher_model`) reading the SAME example WITH the instruction in context (`teacher_*`
         features), run in the same jitted step under stop_gradient; teacher and student logits are
         compared at the positions predicting the same target tokens (`losses.target_positions`),
         padding masked. Or, with `teacher_topk_*` features in the batch (precomputed top-k teacher
         log-probs from `.npz`, see `write_teacher_topk`), `losses.topk_kl_distillation`.
  L_ins  distance of the generated dW = (alpha/r) A @ B to the task's LoRA teacher's (Gram matrices,
         never d x d), masked for tasks without a teacher (teacher_index = -1).
Stage 1 (hypernetwork pretraining on passages) is the same objective with w_kl = w_ins = 0 and
teacher-less batches; stage 2 starts from it through `init_from` (a run dir or its hypernet/ dir).
`tagi_pipeline` runs both from one gin file (scopes `stage1/`, `stage2/`).

Limits: microbatches must be 1 (instruction features are (G, ...), not (B, ...)); with data
parallelism G must be divisible by the data-parallel device count.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

from jaxlm.checkpoints.hypernet import find_hypernet_dir, hypernet_config, read_metadata, read_params, save_hypernet
from jaxlm.checkpoints.pretrained import Pretrained, abstract_params, family
from jaxlm.errors import ConfigError
from jaxlm.features import TEACHER_PREFIX, teacher_view
from jaxlm.models import hypernet as hyper_lib
from jaxlm.models import lora as lora_lib
from jaxlm.models.lora import LoraWeights
from jaxlm.train import losses
from jaxlm.checkpoints.teachers import load_teachers
from jaxlm.train.objectives import LanguageModel, _load_pretrained_cached, describe_pretrained, read_pretrained_params

Array = jax.Array
PyTree = Any
MINILM = "all-minilm-l6-v2"
DW_RATIO_LIMIT = 1.0  # ||dW|| / ||W_base|| above this: the adapter outweighs the kernel it adapts
TASK_SHARE_FLOOR = 0.01  # task share below this with a sizeable adapter: one adapter for every task


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _replicate_lead(axes: PyTree) -> PyTree:
    """A leading task axis stays unsharded (every device holds every teacher)."""
    return jax.tree_util.tree_map(lambda s: PartitionSpec(None, *tuple(s)[1:]), axes, is_leaf=_is_spec)


@functools.lru_cache(maxsize=4)
def _teachers_cached(directory: str, family_name: str, config: Any) -> tuple[tuple[str, ...], LoraWeights]:
    target = Pretrained(family_name, config, nn.unbox(abstract_params(family_name, config)), None, "abstract")
    names, stacked = load_teachers(directory, target)
    return tuple(names), jax.tree_util.tree_map(np.asarray, stacked)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TAGIDistillation(LanguageModel):
    """See the module docstring. `hypernet` is a `HypernetConfig` (its `lora` = the generated adapter's
    targets/rank/alpha); `instruction_codec` ("bytes" or a tokenizer name) is recorded in the export so
    `load_hypernet` tokenizes instructions as training did."""

    hypernet: Any = None
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_ins: float = 0.0
    temperature: float = 1.0
    teachers_dir: str | None = None
    teacher_model: str | None = None
    train_encoder: bool = False
    init_from: str | None = None
    instruction_codec: str = "bytes"
    teacher_format: str = "def_pos2"
    student_format: str = "query"

    end_of_run_export = "hypernet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.hypernet, hyper_lib.HypernetConfig):
            raise ConfigError("TAGIDistillation.hypernet: bind a HypernetConfig, e.g. "
                              "TAGIDistillation.hypernet = @HypernetConfig()")
        if self.lora is not None:
            raise ConfigError("TAGIDistillation.lora: leave unset; the generated adapter is HypernetConfig.lora")
        for name in ("w_ce", "w_kl", "w_ins"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TAGIDistillation.{name}={getattr(self, name)} must be >= 0")
        if self.w_ce + self.w_kl + self.w_ins <= 0:
            raise ConfigError("TAGIDistillation: w_ce, w_kl and w_ins are all 0; nothing to train")
        if self.temperature <= 0:
            raise ConfigError(f"TAGIDistillation.temperature={self.temperature} must be > 0")
        if self.w_ins > 0 and not self.teachers_dir:
            raise ConfigError("TAGIDistillation.w_ins > 0 needs TAGIDistillation.teachers_dir (a LoRATeachers dir)")
        if self.teachers_dir and not (Path(self.teachers_dir) / "teachers.json").is_file():
            raise ConfigError(f"TAGIDistillation.teachers_dir={self.teachers_dir!r}: no teachers.json there "
                              "(train teachers with LoRATeachers first)")
        if self.init_from is not None and find_hypernet_dir(self.init_from, missing_ok=True) is None:
            raise ConfigError(f"TAGIDistillation.init_from={self.init_from!r}: no hypernet.json in it, its "
                              "hypernet/ or stage2/hypernet/ (a finished TAGI run dir)")
        if self.hypernet.encoder == "minilm":  # tagi_data tokenizes instructions with the base's vocabulary only
            raise ConfigError("HypernetConfig.encoder='minilm': TAGI data does not produce MiniLM-tokenized "
                              "instructions yet; use encoder='base'")
        if self.hypernet.fusion and self.config.family == "llama" and self.hypernet.fusion_dim is not None:
            raise ConfigError("HypernetConfig.fusion_dim: decoder-only fusion attends to the instruction's own "
                              "keys/values (no projection); leave fusion_dim unset for a Llama base")
        if self.teacher_model is not None and describe_pretrained(self.teacher_model).config.vocab_size != \
                self.config.vocab_size:
            raise ConfigError(f"TAGIDistillation.teacher_model={self.teacher_model!r}: vocabulary differs from the base")

    # ---------------------------------------------------------------- pieces
    @property
    def spec(self) -> lora_lib.LoraSpec:
        """The generated adapter's LoraSpec (targets, rank r, alpha): `hypernet.lora`."""
        return self.hypernet.lora

    @functools.cached_property
    def slots(self) -> tuple:
        """The `LoraSlot`s the hypernetwork emits, from the base's abstract (boxed) params; computed once.

        Raises:
          ConfigError: `spec.targets` match no module of the base.
        """
        return hyper_lib.lora_slots(abstract_params(self.config.family, self.config), self.spec)

    @property
    def hyper(self) -> hyper_lib.HyperLoRA:
        """The `HyperLoRA` module (config `hypernet`, `slots`)."""
        return hyper_lib.HyperLoRA(self.hypernet, self.slots)

    @property
    def encoder_model(self) -> nn.Module:
        """The instruction encoder's module: MiniLM's `Bert` for encoder="minilm", else the base model."""
        return self.minilm.model if self.hypernet.encoder == "minilm" else self.model

    @property
    def minilm(self) -> Pretrained:
        """The all-MiniLM-L6-v2 checkpoint (loaded once per process).

        Raises:
          CheckpointError: its weight package is not installed.
        """
        return _load_pretrained_cached(MINILM)

    @property
    def encoder_width(self) -> int:
        """E, the width of the instruction states: MiniLM's hidden_size, or the base's d_model / hidden_size."""
        if self.hypernet.encoder == "minilm":
            return self.minilm.config.hidden_size
        return self.config.d_model if self.config.family == "t5" else self.config.hidden_size

    @functools.cached_property
    def teachers(self) -> tuple[tuple[str, ...], LoraWeights] | None:
        """(task names, stacked teachers with numpy leaves (N, ...)) of `teachers_dir`, or None without it.

        Raises:
          CheckpointError: the index or an adapter cannot be read (see `load_teachers`).
        """
        if not self.teachers_dir:
            return None
        return _teachers_cached(str(self.teachers_dir), self.config.family, self.config)

    # ---------------------------------------------------------------- host-loaded frozen parts
    def pretrained_base(self, mesh: Mesh | None = None, abstract: bool = False) -> PyTree | None:
        """Every frozen part read from disk (TrainStep passes them to the jitted init in their shardings).

        Args:
          mesh: place the base and `teacher_model` tensor by tensor on this mesh as they are read
            (see `LanguageModel.pretrained_base`); the small parts (teachers, MiniLM) stay host arrays.
          abstract: `jax.ShapeDtypeStruct`s instead (no model weights read; for `jax.eval_shape`).

        Returns:
          A dict with the present parts of {'base': pretrained base params, 'teachers': stacked teacher
          LoRA params (N, ...), 'kl_teacher': `teacher_model`'s params (in `param_dtype`, like the base),
          'encoder': frozen MiniLM params}, or None when none is read from disk.
        """
        shapes = (lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)) \
            if abstract else (lambda tree: tree)
        host = {}
        if self.pretrained:
            host["base"] = super().pretrained_base(mesh, abstract)
        if self.teachers is not None:
            host["teachers"] = shapes(self.teachers[1].params)
        if self.teacher_model:
            host["kl_teacher"] = read_pretrained_params(self.teacher_model, self.param_dtype or "float32", mesh, abstract)
        if self.hypernet.encoder == "minilm" and not self.train_encoder:
            host["encoder"] = shapes(self.minilm.params)
        return host or None

    def base_logical_axes(self) -> PyTree:
        """Axes of `pretrained_base()` (what TrainStep places), not of the base alone.

        Returns:
          A dict with the same keys as `pretrained_base()` (possibly empty) of logical PartitionSpec
          trees; the teachers' leading task axis is replicated (None).
        """
        axes = {}
        if self.pretrained:
            axes["base"] = super().base_logical_axes()
        if self.teachers is not None:
            axes["teachers"] = self._teacher_axes()
        if self.teacher_model:
            axes["kl_teacher"] = describe_pretrained(self.teacher_model).logical_axes()
        if self.hypernet.encoder == "minilm" and not self.train_encoder:
            axes["encoder"] = self.minilm.logical_axes()
        return axes

    def _teacher_axes(self) -> PyTree:
        stacked = self.teachers[1]
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stacked.params)
        axes = lora_lib.lora_logical_axes(LoraWeights(abstract, stacked.rank, stacked.alpha),
                                          super().base_logical_axes())
        return _replicate_lead(axes)

    # ---------------------------------------------------------------- params
    def _dummy_instruction(self) -> tuple[Array, Array]:
        return jnp.zeros((1, 1, self.encoder_width), jnp.float32), jnp.ones((1, 1), bool)

    def init(self, rng: Array, host: PyTree | None = None) -> tuple[PyTree, PyTree]:
        """(trainable, frozen) params; works under `jax.eval_shape`.

        Args:
          rng: a PRNG key, split into the base init's key (replaced by PRNGKey(init_seed) when set) and
            the hypernetwork init's key.
          host: the frozen parts to use (TrainStep passes `pretrained_base(mesh)`, or its abstract
            form under `jax.eval_shape`); None reads them now with `pretrained_base()`. Without a 'base' entry the base is randomly initialised.

        Returns:
          trainable: {'hypernet': HyperLoRA params (from `init_from` when set)}, plus 'encoder' (the
            base, or MiniLM, params; from `init_from` when set) when `train_encoder`.
          frozen: {'base': base params} plus the other entries of `host`.

        Raises:
          ConfigError: `init_from`'s saved params lack a part or differ in structure or shape.
        """
        rng_base, rng_hyper = jax.random.split(rng)
        if self.init_seed is not None:
            rng_base = jax.random.PRNGKey(self.init_seed)
        host = dict(self.pretrained_base() or {}) if host is None else dict(host)
        if "base" in host:
            base = host.pop("base")
        else:
            fam = family(self.config.family)
            base = nn.unbox(self.model.init(rng_base, *fam.init_args(self.config))["params"])
        hyper_params = nn.unbox(self.hyper.init(rng_hyper, *self._dummy_instruction())["params"])
        if self.init_from is not None:
            hyper_params = _load_into(self.init_from, "hypernet", hyper_params)
        trainable = {"hypernet": hyper_params}
        frozen = {"base": base, **host}
        if self.train_encoder:
            encoder = self.minilm.params if self.hypernet.encoder == "minilm" else base
            if self.init_from is not None:
                encoder = _load_into(self.init_from, "encoder", encoder)
            trainable["encoder"] = encoder
        return trainable, frozen

    def logical_axes(self) -> tuple[PyTree, PyTree]:
        """Logical PartitionSpecs matching `init`'s (trainable, frozen).

        Returns:
          ({'hypernet': ..., + 'encoder' when `train_encoder`}, {'base': ..., + the other parts of
          `base_logical_axes()`}).
        """
        boxed = jax.eval_shape(lambda: self.hyper.init(jax.random.PRNGKey(0), *self._dummy_instruction())["params"])
        trainable = {"hypernet": nn.get_partition_spec(boxed)}
        base_axes = super().base_logical_axes()
        frozen = {"base": base_axes, **{k: v for k, v in self.base_logical_axes().items() if k != "base"}}
        if self.train_encoder:
            trainable["encoder"] = self.minilm.logical_axes() if self.hypernet.encoder == "minilm" else base_axes
        return trainable, frozen

    # ---------------------------------------------------------------- the hypernetwork
    def encoder_params(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        """The instruction encoder's params.

        Args:
          trainable: the trainable params.
          frozen: the frozen params.

        Returns:
          `trainable['encoder']` when `train_encoder`, else the frozen MiniLM (encoder="minilm") or base
          params under `jax.lax.stop_gradient`.
        """
        if self.train_encoder:
            return trainable["encoder"]
        params = frozen["encoder"] if self.hypernet.encoder == "minilm" else frozen["base"]
        return jax.lax.stop_gradient(params)

    def emit_lora(self, trainable: PyTree, frozen: PyTree, ids_GxT: Array, mask_GxT: Array):
        """(LoRA with leaves (G, ...), fused instruction states (G, T, D) or None): one pass per task.

        Args:
          trainable: the trainable params ({'hypernet', optionally 'encoder'}).
          frozen: the frozen params.
          ids_GxT: integer instruction token ids (G, T), one row per task.
          mask_GxT: (G, T), 1 on instruction tokens.

        Returns:
          (LoraWeights with float32 leaves (G, D_in, r) / (G, r, D_out) and the spec's rank and alpha,
          float32 instruction states (G, T, D) for T5 fusion when `hypernet.fusion`, else None; a
          decoder-only base's fusion reads the instruction tokens themselves, see `student_logits`).
        """
        h_GxTxE = hyper_lib.encode_instruction(self.hypernet.encoder, self.encoder_model,
                                               self.encoder_params(trainable, frozen), ids_GxT, mask_GxT,
                                               self.hypernet.encoder_layer)
        t5_fusion = self.hypernet.fusion and self.config.family == "t5"
        out = self.hyper.apply({"params": trainable["hypernet"]}, h_GxTxE, mask_GxT, with_fusion=t5_fusion)
        return out if t5_fusion else (out, None)

    # ---------------------------------------------------------------- the loss
    def student_logits(self, params: PyTree, batch: Mapping[str, Array], lora_G: LoraWeights,
                       fused_GxTxD: Array | None) -> Array:
        """The student's logits: the input without the instruction in the prompt, run with the generated LoRA.

        With `hypernet.fusion` the student also reads its instruction. Encoder-decoder (T5): the
        instruction states are joined to the encoder output (`hyper_lib.fused_logits`). Decoder-only:
        the instruction tokens (`instruction_tokens`, the base's vocabulary: encoder="base") are a cached
        prefix (`jaxlm.models.prefix`): their keys/values are computed once per task by the adapted model
        and every example of the task attends to them, exactly as if they preceded its tokens.

        Args:
          params: the base params.
          batch: a TAGI batch (`jaxlm.features`) with `task_index` (B,); with fusion also
            `instruction_tokens` / `instruction_mask` (G, T) and (T5) `encoder_segment_ids`,
            `decoder_segment_ids`.
          lora_G: the generated adapters, one per task, leaves (G, ...); example b uses task_index[b]'s.
          fused_GxTxD: instruction states (G, T, D) to join to the T5 encoder output, or None.

        Returns:
          float32 logits (B, L, V) (T5: (B, Ld, V)).

        Raises:
          KeyError: a required feature is missing.
        """
        task_B = batch["task_index"]
        lora_B = lora_lib.per_example(lora_G, task_B)
        if self.hypernet.fusion and self.config.family == "llama":
            from jaxlm.models import prefix as prefix_lib

            ids, segments = batch["decoder_input_tokens"], batch.get("decoder_segment_ids")
            mask = jnp.ones(ids.shape, bool) if segments is None else segments > 0
            cache_G, length_G = prefix_lib.prefix_cache(self.model, params, batch["instruction_tokens"],
                                                        batch["instruction_mask"], extra_slots=ids.shape[1], lora=lora_G)
            return prefix_lib.continue_from_prefix(
                self.model, params, prefix_lib.take_rows(cache_G, task_B), jnp.take(length_G, task_B), ids, mask,
                batch.get("decoder_positions"), lora=lora_B, prefix_slots=batch["instruction_tokens"].shape[1])
        if fused_GxTxD is None:
            return self.logits(params, batch, lora_B)
        enc_ids = batch["encoder_input_tokens"]
        return hyper_lib.fused_logits(
            self.model, params, enc_ids, batch["encoder_segment_ids"] > 0, batch["decoder_input_tokens"],
            jnp.take(fused_GxTxD, task_B, axis=0), jnp.take(batch["instruction_mask"], task_B, axis=0), lora=lora_B,
            decoder_attention_mask_BxM=batch["decoder_segment_ids"] > 0,
        )

    def _teacher_logits(self, frozen: PyTree, batch: Mapping[str, Array], index_BxT: Array | None) -> Array:
        view = teacher_view(batch)
        if not view:
            raise ConfigError("TAGIDistillation.w_kl > 0 but the batch has no teacher_* features "
                              "(set the data's teacher_features=True, or w_kl = 0 for pretraining)")
        if self.teacher_model:
            pre = describe_pretrained(self.teacher_model, self.param_dtype or "float32")
            model, params = pre.model, frozen["kl_teacher"]
        else:
            model, params = self.model, frozen["base"]
        if self.config.family == "t5":
            logits = model.apply({"params": params}, view["encoder_input_tokens"], None, view["decoder_input_tokens"],
                                 None, encoder_segment_ids=view.get("encoder_segment_ids"),
                                 decoder_segment_ids=view.get("decoder_segment_ids"))
        else:
            logits = model.apply({"params": params}, view["decoder_input_tokens"], None, view.get("decoder_positions"),
                                 segment_ids=view.get("decoder_segment_ids"), gather_index=index_BxT)
        return jax.lax.stop_gradient(logits)

    def _kl(self, frozen: PyTree, batch: Mapping[str, Array], logits_BxLxV: Array) -> Array:
        weights_BxL = batch["decoder_loss_weights"]
        t = self.temperature
        if "teacher_topk_ids" in batch:  # precomputed: (B, K_targets, k), k-th target token of each row
            n = batch["teacher_topk_ids"].shape[1]
            idx_BxT, valid_BxT = losses.target_positions(weights_BxL, n)
            student = jnp.take_along_axis(logits_BxLxV, idx_BxT[..., None], axis=1)
            total, weight = losses.topk_kl_distillation(
                batch["teacher_topk_logprobs"], batch["teacher_topk_ids"], student,
                valid_BxT * batch["teacher_topk_valid"], t)
            return losses.safe_mean(total, weight)
        if self.config.family == "t5":  # same targets -> same decoder rows: positions already aligned
            teacher = self._teacher_logits(frozen, batch, None)
            total, weight = losses.kl_distillation(teacher, logits_BxLxV, weights_BxL, t)
            return losses.safe_mean(total, weight)
        t_weights = batch[TEACHER_PREFIX + "decoder_loss_weights"]
        n = min(weights_BxL.shape[1], t_weights.shape[1])
        idx_s, valid_s = losses.target_positions(weights_BxL, n)
        idx_t, valid_t = losses.target_positions(t_weights, n)
        teacher = self._teacher_logits(frozen, batch, idx_t)
        student = jnp.take_along_axis(logits_BxLxV, idx_s[..., None], axis=1)
        total, weight = losses.kl_distillation(teacher, student, valid_s * valid_t, t)
        return losses.safe_mean(total, weight)

    def _ins(self, lora_G: LoraWeights, frozen: PyTree, batch: Mapping[str, Array]) -> Array:
        stacked = self.teachers[1]
        index_G = batch["teacher_index"]
        teacher = jax.tree_util.tree_map(lambda x: jnp.take(x, jnp.maximum(index_G, 0), axis=0), frozen["teachers"])
        student_tree, teacher_tree = _common_modules(lora_G.params, teacher)
        total, count = losses.lora_alignment_loss(
            lora_G.replace(params=student_tree), LoraWeights(teacher_tree, stacked.rank, stacked.alpha),
            task_mask_N=index_G >= 0)
        return losses.safe_mean(total, count)

    def loss(self, trainable: PyTree, frozen: PyTree, batch: Mapping[str, Array], rng: Array) -> tuple[Array, dict]:
        """w_ce L_ce + w_kl L_kl + w_ins L_ins of a TAGI batch (see the module docstring).

        Each term is a mean: L_ce and L_kl token-weighted (nats per target token, L_kl x T^2), L_ins
        over the tasks that have a LoRA teacher. L_kl is computed only when w_kl > 0, L_ins only when
        w_ins > 0.

        Args:
          trainable: {'hypernet', optionally 'encoder'} params.
          frozen: {'base', optionally 'teachers', 'kl_teacher', 'encoder'} params.
          batch: a TAGI batch: G tasks x B/G examples with `instruction_tokens` (G, T),
            `instruction_mask` (G, T), `task_index` (B,) in [0, G), the `decoder_*` (/ `encoder_*`)
            features, and for L_kl the `teacher_*` rows or `teacher_topk_*` arrays, for L_ins
            `teacher_index` (G,) (-1: no teacher).
          rng: unused.

        Returns:
          (float32 total loss, {'loss_ce', 'loss_kl' / 'loss_ins' when computed, 'accuracy':
          token-weighted argmax accuracy of the student}).

        Raises:
          ConfigError: a TAGI feature is missing; w_kl > 0 and the batch has neither `teacher_*` nor
            `teacher_topk_*` features; w_ins > 0 and the teachers adapt none of the generated modules.
        """
        del rng
        for name in ("instruction_tokens", "instruction_mask", "task_index"):
            if name not in batch:
                raise ConfigError(f"TAGIDistillation needs batch[{name!r}]: use the TAGI data (jaxlm.data.tagi_batches.TagiBatches)")
        lora_G, fused = self.emit_lora(trainable, frozen, batch["instruction_tokens"], batch["instruction_mask"])
        logits_BxLxV = self.student_logits(frozen["base"], batch, lora_G, fused)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        total, weight = losses.weighted_cross_entropy(logits_BxLxV, targets, weights)
        terms = {"ce": losses.safe_mean(total, weight)}
        if self.w_kl > 0:
            terms["kl"] = self._kl(frozen, batch, logits_BxLxV)
        if self.w_ins > 0:
            terms["ins"] = self._ins(lora_G, frozen, batch)
        term_weights = {"ce": self.w_ce, "kl": self.w_kl, "ins": self.w_ins}
        loss, metrics = losses.combine_losses(terms, {k: w for k, w in term_weights.items() if k in terms})
        hits, _ = losses.token_accuracy(logits_BxLxV, targets, weights)
        metrics["accuracy"] = losses.safe_mean(hits, weight)
        metrics.update(self.adapter_metrics(jax.lax.stop_gradient(lora_G), frozen["base"]))
        return loss, metrics

    # ---------------------------------------------------------------- monitoring
    def adapter_metrics(self, lora_G: LoraWeights, base: PyTree) -> dict[str, Array]:
        """What to watch while a hypernetwork trains (logged with every step's metrics).

        Args:
          lora_G: the adapters emitted for the batch's G tasks, leaves (G, D_in, r) / (G, r, D_out).
          base: the frozen base params (the adapted kernels' norms).

        Returns:
          {"dw_ratio/<module type>": mean over tasks and layers of ||dW|| / ||W_base|| (Frobenius; '/' in
          the module type written '.'), "task_share": the fraction of the batch's ||dW||^2 that differs
          between tasks (`losses.lora_task_share`)}, float32 scalars.
        """
        sq = losses.lora_sq_norm(lora_G)
        by_type: dict[str, list[Array]] = {}
        for slot in self.slots:
            kernel = functools.reduce(lambda tree, key: tree[key], slot.path, base)["kernel"]
            norm = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32))))
            ratio_G = jnp.sqrt(sq[slot.path]) / jnp.maximum(norm, 1e-12)
            by_type.setdefault(slot.module, []).append(jnp.mean(ratio_G))
        out = {f"dw_ratio/{module.replace('/', '.')}": jnp.mean(jnp.stack(v)) for module, v in by_type.items()}
        out["task_share"] = losses.lora_task_share(lora_G)
        return out

    def metric_warnings(self, metrics: Mapping[str, float], peaks: Mapping[str, float]) -> dict[str, str]:
        """{kind: one-line warning} for a logged step's metrics (the loop prints each kind once).

        "dw_ratio": the emitted adapters outweigh the base kernels (some dw_ratio > DW_RATIO_LIMIT).
        "task_share": the between-task share collapsed: below TASK_SHARE_FLOOR after having reached 5x
        that earlier in the run (`peaks`: each metric's maximum so far), while some dw_ratio > 0.05. A
        share that is still low early on (dW = 0 at init, or stage 1's task-independent adapter at the
        start of stage 2) is not a collapse.
        """
        ratios = {k.removeprefix("dw_ratio/"): v for k, v in metrics.items() if k.startswith("dw_ratio/")}
        if not ratios:
            return {}
        module, worst = max(ratios.items(), key=lambda kv: kv[1])
        out = {}
        if worst > DW_RATIO_LIMIT:
            out["dw_ratio"] = (f"TAGI: emitted ||dW||/||W|| = {worst:.2f} for {module} (> {DW_RATIO_LIMIT}): the "
                               "generated adapters outweigh the base kernels; lower the learning rate (or the "
                               "heads' lr_multipliers) or keep HypernetConfig.head_scaling = 'width'")
        share, peak = metrics.get("task_share"), peaks.get("task_share", 0.0)
        if share is not None and share < TASK_SHARE_FLOOR <= peak / 5 and worst > 0.05:
            out["task_share"] = (f"TAGI: the share of the emitted adapters' ||dW||^2 that differs between tasks "
                                 f"fell to {100 * share:.1f}% (peak {100 * peak:.1f}%) while ||dW||/||W|| reaches "
                                 f"{worst:.2f}: the hypernetwork now emits one adapter for every task (check the "
                                 "learning rate and the instruction encoding)")
        return out

    # ---------------------------------------------------------------- export
    def export(self, output: str | Path, trainable: PyTree, frozen: PyTree, *, merged: bool = False,
               dtype: str = "float32") -> Path:
        """The hypernetwork export at `output` (`jaxlm.checkpoints.hypernet`; the loop writes RUN/hypernet/).

        Args:
          output: the directory to write (atomically).
          trainable: the trainable params.
          frozen: the frozen params; `frozen['base']` is written to `output/base/` unless `pretrained`
            is a HF directory on disk (then the export points at it).
          merged: must be False.
          dtype: must be "float32" (`load_hypernet` reads float32 hypernetwork and base files).

        Returns:
          The written directory.

        Raises:
          ConfigError: `merged=True` (the adapter depends on the instruction), or `dtype` is not float32.
        """
        if merged:
            raise ConfigError("TAGIDistillation: merged=True is not defined (the adapter depends on the instruction)")
        if dtype != "float32":
            raise ConfigError(f"TAGIDistillation: export dtype {dtype!r} is not supported; a hypernetwork export "
                              "is written in float32")
        return save_hypernet(output, self, jax.device_get(trainable), frozen)  # the base: written tensor by tensor


# Lengths the teacher top-k forward pads to: steps of 1.5x and 2x (at most 1/3 padding), a bounded
# number of compiled shapes.
TOPK_LENGTH_BUCKETS: tuple[int, ...] = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def write_teacher_topk(path: str | Path, tasks: Any, pretrained: Pretrained, *, k: int = 32,
                       max_targets: int = 128, batch_size: int = 8, lora: LoraWeights | None = None,
                       max_input_len: int | None = None) -> Path:
    """Precompute a (large) decoder-only teacher's top-k log-probs at each target token of every
    example, reading the teacher rows (instruction in context) of `tasks` (jaxlm.data.tagi_tasks.TagiTask), and
    save them as ONE `.npz` (never JSON): per task `<task>/ids`, `<task>/logprobs` (N, max_targets, k)
    and `<task>/valid` (N, max_targets). Training then reads them through
    `tagi_batches.load_teacher_topk` -> `TagiBatches(teacher_topk=...)` and `losses.topk_kl_distillation`,
    with no teacher forward in the step (nor in data loading).

    Args:
      path: the `.npz` to write (atomically).
      tasks: TagiTasks with teacher rows.
      pretrained: the decoder-only teacher (its params and model).
      k: log-probs kept per target token (at most the vocabulary).
      max_targets: T, target tokens per example with a cached distribution.
      batch_size: at most this many rows per teacher forward (a task's rows, in length order, split
        into batches of near-equal size).
      lora: an adapter applied to the teacher, or None.
      max_input_len: a teacher input longer than this keeps its LAST max_input_len tokens (the batches'
        rule, jaxlm.data.batches); None keeps it whole.

    Resumable: each finished task is kept in `<path>.parts/` (removed once `path` is written); a rerun
    with the same tasks and settings skips them.

    Returns:
      The written path.

    Raises:
      ConfigError: a non-llama teacher, or a task without teacher rows.
    """
    from jaxlm import progress
    from jaxlm.buckets import bucket_length, pad_rows
    from jaxlm.files import write_atomically

    if pretrained.family != "llama":
        raise ConfigError("write_teacher_topk: decoder-only (llama family) teachers only")
    model, params = pretrained.model, pretrained.params
    k = min(k, pretrained.config.vocab_size)

    @jax.jit
    def topk(params, lora, ids, mask, gather):  # params as arguments: never baked into the jit
        logits = model.apply({"params": params}, ids, mask, lora=lora, gather_index=gather)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        values, index = jax.lax.top_k(logp, k)
        return index, values

    arrays: dict[str, np.ndarray] = {}
    tasks = list(tasks)
    # A killed run resumes: each finished task is kept in PATH.parts/<i>.npz until the whole file is written.
    parts = Path(str(path) + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    # Parts are reused only for the same teacher (its source, config and adapter values) and settings.
    adapter = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(None if lora is None else lora.params):
        adapter.update(np.asarray(leaf).tobytes())
    settings = (f"{len(tasks)} {k} {max_targets} {max_input_len} {[t.name for t in tasks]} {pretrained.source} "
                f"{pretrained.config!r} {None if lora is None else (lora.rank, lora.alpha, adapter.hexdigest())}")
    if (parts / "settings.txt").is_file() and (parts / "settings.txt").read_text() != settings:
        shutil.rmtree(parts)  # written for other tasks or settings: start over
        parts.mkdir(parents=True)
    (parts / "settings.txt").write_text(settings)
    bar = progress.bar(sum(t.teacher.num_examples for t in tasks if t.teacher is not None), "teacher top-k", "row")
    for i, task in enumerate(tasks):
        if task.teacher is None:
            raise ConfigError(f"write_teacher_topk: task {task.name!r} has no teacher rows")
        part = parts / f"{i:05d}.npz"
        if part.is_file():
            with np.load(part) as z:
                arrays.update({f"{task.name}/{key}": z[key] for key in ("ids", "logprobs", "valid")})
            bar.update(task.teacher.num_examples)
            continue
        n = task.teacher.num_examples
        ids_out = np.zeros((n, max_targets, k), np.int32)
        lp_out = np.zeros((n, max_targets, k), np.float32)
        valid = np.zeros((n, max_targets), np.float32)
        rows, gathers = [], []
        for e in range(n):
            inp, tgt = task.teacher.inputs(e), task.teacher.targets(e)
            if max_input_len is not None and len(inp) > max_input_len:
                inp = inp[len(inp) - max_input_len:]
            t = min(len(tgt), max_targets)
            # The log-probs at the first t target tokens see only the input and tgt[:t - 1]: the
            # rest of a long target is never run (causal attention; the same numbers, shorter rows).
            rows.append(np.concatenate([inp, tgt[:t]]).tolist())
            gathers.append([len(inp) - 1 + j for j in range(t)] + [0] * (max_targets - t))
            valid[e, :t] = 1.0
        # Rows in length order, in ceil(n / batch_size) batches of near-equal size (10 rows at batch 8
        # run as 2 x 5, not 8 + 2 padded to 8), each padded to a fine length bucket: the padding is
        # what the forward costs here (a 1,056-token row once padded every row of its batch to 2,048).
        order = sorted(range(n), key=lambda e: len(rows[e]))
        per_batch = -(-n // -(-n // batch_size))
        for start in range(0, n, per_batch):
            chunk = order[start:start + per_batch]
            batch = [rows[e] for e in chunk] + [rows[chunk[0]]] * (per_batch - len(chunk))
            gather = [gathers[e] for e in chunk] + [gathers[chunk[0]]] * (per_batch - len(chunk))
            ids, mask = pad_rows(batch, bucket_length(max(map(len, batch)), TOPK_LENGTH_BUCKETS), 0)
            index, values = topk(params, lora, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(np.asarray(gather, np.int32)))
            ids_out[chunk] = np.asarray(index)[:len(chunk)]
            lp_out[chunk] = np.asarray(values)[:len(chunk)]
            bar.update(len(chunk))
        arrays.update({f"{task.name}/ids": ids_out, f"{task.name}/logprobs": lp_out, f"{task.name}/valid": valid})
        write_atomically(part, lambda f, a=(ids_out, lp_out, valid): np.savez(f, ids=a[0], logprobs=a[1], valid=a[2]),
                         binary=True)
    bar.close()
    out = write_atomically(Path(path), lambda f: np.savez(f, **arrays), binary=True)
    shutil.rmtree(parts)
    return out


def _common_modules(student: PyTree, teacher: PyTree) -> tuple[dict, dict]:
    """The sub-trees of modules adapted by both (a teacher may target more modules than the hypernet)."""
    from jaxlm.checkpoints.hf import flatten, unflatten

    s_flat, t_flat = flatten(student), flatten(teacher)  # leaves keyed (module path..., 'a' | 'b')
    common = sorted(set(s_flat) & set(t_flat))
    if not common:
        raise ConfigError("TAGIDistillation.w_ins > 0 but the teachers adapt none of HypernetConfig.lora.targets")
    return unflatten({p: s_flat[p] for p in common}), unflatten({p: t_flat[p] for p in common})


def _load_into(init_from: str, part: str, fresh: PyTree) -> PyTree:
    """Params `part` of a saved hypernetwork, checked against the fresh init's structure and shapes."""
    from jaxlm.checkpoints.hf import flatten

    saved = read_params(find_hypernet_dir(init_from))
    if part not in saved:
        raise ConfigError(f"TAGIDistillation.init_from={init_from!r}: the saved hypernetwork has no {part!r} params")
    want = {k: tuple(v.shape) for k, v in flatten(fresh).items()}
    got = {k: tuple(v.shape) for k, v in flatten(saved[part]).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        saved_scaling = hypernet_config(read_metadata(find_hypernet_dir(init_from))).head_scaling
        fresh_scaling = "width" if any(k[-1].endswith("_a_init") for k in want) else "none"
        hint = (f"; it was trained with HypernetConfig.head_scaling={saved_scaling!r}, this run uses "
                f"{fresh_scaling!r}" if part == "hypernet" and saved_scaling != fresh_scaling else "")
        raise ConfigError(f"TAGIDistillation.init_from={init_from!r}: {part} params differ from this "
                          f"HypernetConfig/base (first differences: {diff}){hint}")
    return jax.tree_util.tree_map(lambda f, s: jnp.asarray(s, f.dtype), fresh, saved[part])
