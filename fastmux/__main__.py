"""``python -m fastmux <command>``.

Commands live in SUBCOMMANDS: a name mapped to its help line, a function
that adds its arguments and the function that runs it.  To add one (say
``echo``), write those two functions in their own module and add an entry;
modules are imported only when their command runs, so ``python -m fastmux
bench`` does not pay for the others and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, NamedTuple, Optional


class Subcommand(NamedTuple):
    help: str
    module: str  # defines add_arguments(parser) and run(namespace) -> int


SUBCOMMANDS: Dict[str, Subcommand] = {
    "bench": Subcommand("benchmark fastmux against asyncio, uvloop, pure-Python and C "
                        "servers", "fastmux._bench"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmux")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    args_list = sys.argv[1:] if argv is None else argv
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        # Import the module only for the command being run (its imports may be
        # heavy or optional); the others get a bare parser for --help.
        if args_list[:1] == [name]:
            importlib.import_module(cmd.module).add_arguments(p)
    args = parser.parse_args(args_list)
    mod = importlib.import_module(SUBCOMMANDS[args.command].module)
    return int(mod.run(args))


if __name__ == "__main__":
    sys.exit(main())
