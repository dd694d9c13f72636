"""jaxlm: a JAX/Flax research codebase for instruction learning."""

from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path, dtype: str = "float32", param_dtype: str = "float32", mesh=None, weights: bool = True):
    """Config, params and tokenizer of a HF directory, a .gguf file, or an installed weight package
    name (`smollm2-135m-instruct`, `all-minilm-l6-v2`); `dtype` computes, `param_dtype` holds the
    params, `mesh` (a `jaxlm.sharding.make_mesh` mesh) places each tensor on its shards as it is
    read, `weights=False` reads config, tokenizer and shapes only. See `jaxlm.checkpoints.pretrained`."""
    from jaxlm.checkpoints.pretrained import load_pretrained as _load

    return _load(path, dtype, param_dtype, mesh, weights)


__all__ = ["load_pretrained", "__version__"]
