"""Progress bars for long CLI work (lines scored, tensors loaded, texts embedded, eval cells).

One rule everywhere: a tqdm bar on stderr when stderr is a terminal, nothing when it is a file or a
pipe (logs stay clean). `JAXLM_PROGRESS=1` forces bars on, `=0` off.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def enabled() -> bool:
    """Whether bars are shown: $JAXLM_PROGRESS when set ("0" off, anything else on), else stderr is a TTY."""
    forced = os.environ.get("JAXLM_PROGRESS")
    if forced is not None:
        return forced != "0"
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it", *, show: bool | None = None) -> Any:
    """A tqdm bar (call `.update(n)`, close it or use it as a context manager).

    Args:
      total: the number of units, or None when unknown.
      desc: the label, e.g. "score".
      unit: what one unit is ("line", "tensor", "cell").
      show: force on/off; None follows `enabled()`.

    Returns:
      A `tqdm.auto.tqdm` writing to stderr, disabled (a no-op) when not shown.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled() if show is None else show),
                file=sys.stderr, dynamic_ncols=True, leave=False)
