"""``python -m fastmux <command>``.

Commands live in SUBCOMMANDS: a name mapped to its help line and where its
two functions live -- ``add_arguments(parser)`` and ``run(namespace) -> int``
-- either a module (``"fastmux.bench.cli"``) or an object in one
(``"fastmux._cli:echo"``).  To add a command, write those two functions and
add an entry; modules are imported only when their command runs, so
``python -m fastmux bench`` does not pay for the others and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Dict, List, NamedTuple, Optional


class Subcommand(NamedTuple):
    help: str
    module: str  # "pkg.mod" or "pkg.mod:obj", with add_arguments(parser) and run(ns) -> int


SUBCOMMANDS: Dict[str, Subcommand] = {
    "bench": Subcommand("benchmark fastmux against asyncio, uvloop, pure-Python and C "
                        "servers", "fastmux.bench.cli"),
    "echo": Subcommand("line echo server (the echo example); --workers N forks N processes",
                       "fastmux._cli:echo"),
    "http": Subcommand('HTTP "Hello, world!" keep-alive server (the http_hello example)',
                       "fastmux._cli:http"),
}


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmux")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    args_list = sys.argv[1:] if argv is None else argv
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        # Import the module only for the command being run (its imports may be
        # heavy or optional); the others get a bare parser for --help.
        if args_list[:1] == [name]:
            _load(cmd.module).add_arguments(p)
    args = parser.parse_args(args_list)
    mod = _load(SUBCOMMANDS[args.command].module)
    return int(mod.run(args))


if __name__ == "__main__":
    sys.exit(main())
