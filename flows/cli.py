"""The `modelferry` command: the parser, one output path (a table or `--json`) and one mapping from
failure to exit code. Each command, its flags and what it does are in `commands.py`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from modelferry.flows import interrupts, process_defaults
from modelferry.flows.commands import COMMANDS, Output
from modelferry.flows.flags import add_flags, parsed
from modelferry.tasks.errors import ModelferryError, SettingsError, StepFailed, first_line
from modelferry.tasks.settings import check_all, help_epilog

EPILOG = help_epilog() + "\n\nexit codes: 0 ok, 1 failed, 2 usage or settings error"


def parser() -> argparse.ArgumentParser:
    """The whole command line: one sub-command per entry of `commands.COMMANDS`, with its flags."""
    p = argparse.ArgumentParser(
        prog="modelferry",
        description="Stage LLM weights into R2 with a verified integrity chain, launch vLLM on SkyPilot spot GPUs that "
                    "stream them, and time every phase of the cold start.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        add_flags(sub.add_parser(command.name, help=command.help, description=command.description,
                                 epilog=command.epilog, formatter_class=argparse.RawDescriptionHelpFormatter),
                  command.flags)
    return p


def _print_table(rows: list[dict]) -> None:
    from tabulate import tabulate

    print(tabulate(rows, headers="keys", tablefmt="plain", missingval="None") if rows else "(none)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "filelock", "alembic"):  # alembic: SkyPilot's state DB
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show(out: Output, as_json: bool) -> None:
    """The one output path: `data` as JSON on stdout, or the rows as a table and the lines as text."""
    if as_json:
        print(json.dumps(out.data))
        return
    if out.rows is not None:
        _print_table(out.rows)
    for line in out.lines:
        print(line)


def exit_code(exc: BaseException) -> int:
    """0 ok, 1 failed, 2 usage or settings error, 128+N killed by signal N; a failed step by its cause."""
    if isinstance(exc, StepFailed):
        exc = exc.cause
    if isinstance(exc, KeyboardInterrupt):
        return 128 + getattr(exc, "signum", signal.SIGINT)
    return 2 if isinstance(exc, SettingsError) else 1


def error_line(exc: BaseException) -> str:
    """The one line a failure prints: our errors already name the fix; anything else says -v shows more."""
    from modelferry.tasks.settings import scrub

    if isinstance(exc, StepFailed):
        exc = exc.cause if isinstance(exc.cause, ModelferryError) else exc
    if isinstance(exc, ModelferryError):
        return f"error: {exc}"
    return f"error: {type(exc).__name__}: {scrub(first_line(exc))} (run with -v for the traceback)"


def main(argv: list[str] | None = None) -> int:
    process_defaults()
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    interrupts.install()
    try:
        check_all()  # a variable the run would read later is refused now, by name
        command = COMMANDS[args.command]
        out = command.run(parsed(command.flags, args))
    except KeyboardInterrupt as exc:
        interrupts.say_interrupted()
        return exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - a bug or an untyped failure is still one line; -v for the rest
        if args.verbose and not isinstance(exc, ModelferryError):
            raise
        print(error_line(exc), file=sys.stderr)
        return exit_code(exc)
    show(out, getattr(args, "json", False))
    if out.failure:
        print(error_line(out.failure), file=sys.stderr)
        return exit_code(out.failure)
    return 0
