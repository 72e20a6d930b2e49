"""The `latentpatch` command: the parser, built from one module per subcommand, and its one error boundary.

Errors print one line and exit with status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from latentpatch.cli.common import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits 2; the CLI's contract is one line and exit 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentpatch", description="Causal experiments on sparse-autoencoder latents.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the package version and the TransformerLens backend, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    from latentpatch.cli import (attribute, circuit, corpus, dashboards, demo, evaluate, harvest, heads, inspect, patch, paths,
                                 releases, repair, residual, safety, serve, steer, trace, train)

    for command in (demo, releases, inspect, train, harvest, corpus, evaluate, patch, attribute, residual, heads, paths,
                    circuit, trace, repair, safety, steer, dashboards, serve):
        command.register(sub)
    for command in sub.choices.values():  # `--debug` after the subcommand too; SUPPRESS keeps the top-level value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def version_line() -> str:
    """`latentpatch X (TransformerLens Y, backend hooked)`, read from the installed metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"latentpatch {installed('latentpatch')} (TransformerLens {installed('transformer-lens')}, backend hooked; "
            f"SAELens {installed('sae-lens')})")


def _text(result: dict[str, Any], indent: str = "") -> str:
    """The human form of a command's result where the command has no `describe` of its own: nested
    keys indented, numbers rounded, lists of scalars joined, lists of records as a table; never a
    Python repr."""
    from latentpatch.cli.common import table

    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", _text(value, indent + "  ")]
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            columns = list(dict.fromkeys(name for item in value for name in item))
            rows = [tuple(columns)] + [tuple(_cell(item.get(name)) for name in columns) for item in value]
            lines += [f"{indent}{key}:"] + [indent + "  " + line for line in table(rows).splitlines()]
        else:
            lines.append(f"{indent}{key}: {_cell(value)}")
    return "\n".join(line for line in lines if line)


def _cell(value: Any) -> str:
    """One value for people: floats to 4 significant digits, lists joined, records as key=value."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) if value else "-"
    return str(value)


# Libraries that log retries and download chatter at WARNING: the CLI reports their failure as one line.
QUIET_LOGGERS = ("huggingface_hub", "urllib3", "transformers", "datasets", "filelock", "httpx", "fsspec")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, command = "--debug" in argv, "latentpatch"
    try:  # everything, imports included, so that Ctrl-C at any moment is one line
        args = build_parser().parse_args(argv)
        debug, command = args.debug, f"latentpatch {args.command}"
        _configure_logging()
        result = args.run(args)
        if result is not None:  # None: a rank other than 0 of a torchrun job (rank 0 reports)
            # A command may describe its result for people (a table, a few sentences); --json is for programs.
            print(json.dumps(result) if args.json else getattr(args, "describe", _text)(result))
    except KeyboardInterrupt as err:  # TrainingInterrupted says which checkpoint it wrote
        print(f"{command}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        return 130
    except Exception as err:  # the CLI's one boundary: one clear line unless --debug
        if debug:
            raise
        print(str(err) if isinstance(err, UsageError) else f"{command}: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


def one_line(err: BaseException) -> str:
    """`Type: message` on one line; the hub's unreachable-host errors say so in plain words."""
    message = " ".join(str(err).split())
    if _is_offline(err):
        return (f"{type(err).__name__}: the Hugging Face hub is unreachable (no network?) and the files are not in the "
                "local cache; use the offline default model (smollm2-135m-instruct) or a machine with network access")
    return f"{type(err).__name__}: {message}"


def _is_offline(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        name = type(seen).__name__
        hub_error = type(seen).__module__ != "builtins" and name in (
            "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "NameResolutionError", "MaxRetryError",
            "OfflineModeIsEnabled")
        if hub_error or "couldn't connect to 'https://huggingface.co'" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for package in ("sae", "patching", "training", "latentpatch"):
        logging.getLogger(package).setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
