"""TensorFlow kept in its corner: the one place jaxlm imports TensorFlow (and seqio, which imports it).

Quiet: `TF_CPP_MIN_LOG_LEVEL` defaults to "2" before the first import (an explicit value in the
environment wins). TensorFlow >= 2.16 logs through absl before absl is initialised, and those lines
-- the oneDNN notice and "Could not find cuda drivers", each printed once per TF shared library, and
"failed call to cuInit" when TF enumerates devices -- ignore that variable; so while TensorFlow is
imported and its devices are set up, the process's stderr (fd 2) points at /dev/null, unless
TF_CPP_MIN_LOG_LEVEL is "0" (the way to see them). Python exceptions still propagate.

On the CPU: right after the import TensorFlow is denied every GPU and TPU
(`tf.config.set_visible_devices([], kind)`), so its input pipeline never reserves accelerator memory
that JAX needs; t5x does both. Only the seqio data path (`jaxlm.data.vocab`, `.tasks`, `.mixtures`,
`.batches`) calls these; the core never does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger(__name__)
LOG_LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
HIDDEN_KINDS = ("GPU", "TPU")
_hidden = False


@contextlib.contextmanager
def _quiet_stderr(enabled: bool) -> Iterator[None]:
    """fd 2 -> /dev/null inside the block (C++ writes included), restored after it."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow() -> ModuleType:
    """TensorFlow, quiet and on the CPU only (see the module docstring).

    Returns:
      The `tensorflow` module.
    """
    global _hidden
    os.environ.setdefault(LOG_LEVEL_VAR, "2")
    if _hidden:
        import tensorflow as tf

        return tf
    failed = []
    with _quiet_stderr(os.environ[LOG_LEVEL_VAR] != "0"):
        import tensorflow as tf

        for kind in HIDDEN_KINDS:
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError) as e:  # TF already initialised its devices
                failed.append(f"{kind}: {e}")
    _hidden = True
    for message in failed:
        log.warning("could not hide devices from TensorFlow: %s", message)
    return tf


def import_seqio() -> ModuleType:
    """seqio, with TensorFlow imported through `import_tensorflow` first.

    Returns:
      The `seqio` module.
    """
    import_tensorflow()
    import seqio

    return seqio
