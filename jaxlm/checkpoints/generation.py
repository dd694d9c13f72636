"""`generation_config.json`: the decoding settings a Hugging Face model ships beside `config.json`.

jaxlm's generation is greedy; of the file's fields it honours `eos_token_id` (an int or a list, which
replaces the tokenizer's / config.json's EOS ids as in transformers) and refuses, when the model is
asked to generate, every field that would change greedy output (`fields.GENERATION_CONFIG`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from jaxlm.checkpoints.fields import refuse
from jaxlm.checkpoints.hf import CheckpointError, read_json_object

GENERATION_CONFIG_NAME = "generation_config.json"
TABLE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """A parsed `generation_config.json`.

    Attributes:
      values: the file's fields as read (written back unchanged by `export_hf`).
      source: the file's path, named in errors.
    """

    values: Mapping[str, Any]
    source: str

    @property
    def eos_token_ids(self) -> tuple[int, ...] | None:
        """The EOS ids greedy decoding stops at, or None when the file names none."""
        eos = self.values.get("eos_token_id")
        if eos is None:
            return None
        return tuple(eos) if isinstance(eos, list) else (eos,)

    def check_greedy(self) -> None:
        """Refuse fields that would make transformers' greedy output differ from jaxlm's.

        Raises:
          CheckpointError: naming the file and the first such field (e.g. repetition_penalty = 1.1).
        """
        refuse(TABLE, self.values, self.source)


def read_generation_config(directory: str | Path) -> GenerationConfig | None:
    """The directory's `generation_config.json`, or None when it has none.

    Args:
      directory: a Hugging Face model directory.

    Returns:
      The parsed file (its `eos_token_id` checked to be an int, a list of ints or null).

    Raises:
      CheckpointError: the file is not a JSON object, or `eos_token_id` has the wrong type.
    """
    file = Path(directory) / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    values = read_json_object(file)
    eos = values.get("eos_token_id")
    ok = eos is None or _is_id(eos) or isinstance(eos, list) and all(_is_id(e) for e in eos)
    if not ok:
        raise CheckpointError(f"{file}: field 'eos_token_id' = {eos!r} must be an int or a list of ints")
    return GenerationConfig(values, str(file))


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def generation_config_to_hf(model_config: Any, previous: GenerationConfig | None) -> dict[str, Any]:
    """The `generation_config.json` `export_hf` writes.

    Args:
      model_config: the model's config (its bos/eos/pad/decoder-start ids are the defaults).
      previous: the file the model was loaded with, whose fields win (written back unchanged).

    Returns:
      A JSON-serialisable dict: bos_token_id, eos_token_id (an int for one id, else a list),
      pad_token_id and decoder_start_token_id where the config has them, then `previous`'s fields.
    """
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
        if getattr(model_config, key, None) is not None:
            out[key] = getattr(model_config, key)
    eos = list(getattr(model_config, "eos_token_ids", ()) or ())
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if previous is not None:
        out.update(previous.values)
    return out
