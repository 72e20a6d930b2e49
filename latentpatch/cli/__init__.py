"""The `latentpatch` command line: one module per subcommand, each with `register(subparsers)` and its
`run_*` function; `entry` builds the parser from them and is the one error boundary."""

from latentpatch.cli.common import UsageError
from latentpatch.cli.entry import build_parser, main

__all__ = ["UsageError", "build_parser", "main"]
