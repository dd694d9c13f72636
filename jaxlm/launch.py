"""What every multi-host launcher (SLURM, TPU pod, local processes) runs in each process:
`python -m jaxlm.launch train --gin_file ... --workdir ...` joins the distributed runtime
(`jaxlm.distributed.initialize_distributed`), then runs the jaxlm command line.

It sits beside `jaxlm/cli.py` at the top of the package: it imports the CLI, nothing imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxlm.cli import main as cli_main
from jaxlm.distributed import initialize_distributed


def main(argv: Sequence[str] | None = None) -> int:
    """Join the distributed runtime (a no-op for one process), then run `jaxlm ARGS...`.

    Args:
      argv: the jaxlm command line without the program name (default: `sys.argv[1:]`).

    Returns:
      The command's exit status (0 ok, 2 a user error).
    """
    initialize_distributed()
    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
