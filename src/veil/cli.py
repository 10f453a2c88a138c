"""The ``veil`` command line: ``veil demo``, ``veil worker``, ``veil token``.

Subcommands live in :data:`COMMANDS`; each takes the arguments after its name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _demo(argv: list[str]) -> int:
    from veil.demo import main

    main(argv)
    return 0


def _worker(argv: list[str]) -> int:
    from veil.net._command import worker_main

    return worker_main(argv)


def _token(argv: list[str]) -> int:
    from veil.net._command import token_main

    return token_main(argv)


#: subcommand -> (help, entry taking the remaining arguments and returning an exit code)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "demo": ("reproduce the paper's experiments and print one table", _demo),
    "worker": ("serve a worker over WebSockets (veil worker --help)", _worker),
    "token": ("make a fresh token for a worker's --token-file", _token),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="veil", description="privacy-preserving deep learning")
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="; ".join(f"{k}: {v[0]}" for k, v in sorted(COMMANDS.items())),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    return COMMANDS[args.command][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
