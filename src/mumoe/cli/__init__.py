"""`mumoe` command line: demo, info, prune, compare, eval, generate, taer, serve, report — one module per
command, its parser section beside its handler. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import MumoeError
from ..settings import SETTINGS
from . import compare, demo, evaluate, generate, info, prune, quantize, report, serve, skipping, taer

COMMANDS = (info, prune, quantize, compare, evaluate, generate, serve, demo, report, taer, skipping)  # in --help order


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one `mumoe: error:` line of every other bad input."""

    def error(self, message: str):
        sys.stderr.write(f"mumoe: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mumoe", description="Prune Mixture-of-Experts language models without "
                                "retraining: expert, atom and weight grain; offline, per task, per prompt.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--verbose", action="store_true", help="also show the libraries' own warnings (transformers' "
                   "are silenced by default: they are about its internals, not about what you asked)")
    p.add_argument("--quiet", action="store_true", help="print only the result (the 'wrote ...' line, the table, "
                   "the generated text) and errors: no stage lines, no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    _add_verbose(p)
    return p


def _version() -> str:
    from ..version import __version__

    return f"mumoe {__version__}"


class Terminated(BaseException):
    """SIGTERM (a scheduler stopping the job): unwinds like Ctrl-C, so temp folders are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose on every (sub)command too (SUPPRESS: a subcommand never resets the top-level flag)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="also show the libraries' own warnings (default: transformers' are silenced)")
                sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                                help="print only the result and errors: no stage lines, no progress bars")
                _add_verbose(sp)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verbose", False):  # read by transformers when it is first imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    SETTINGS.quiet = bool(getattr(args, "quiet", False))
    SETTINGS.trust_remote_code = bool(getattr(args, "trust_remote_code", False))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except MumoeError as e:
        print(f"mumoe: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not the input: disk full, read-only or vanished files
        from ..errors import os_message

        print(f"mumoe: error: {os_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mumoe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("mumoe: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
