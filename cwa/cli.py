"""The `cwa` command line: wires the subcommands and maps errors to one-line messages.

Library errors (`cwa.errors`) become one line on stderr with exit code 2 (usage) or 1
(run-time failure); set CWA_DEBUG=1 for the traceback. SIGTERM is turned into an
exception so that an interrupted stage removes its temporary file like on Ctrl-C.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import typer

from cwa.commands.control import control_cmd
from cwa.commands.eval import eval_cmd
from cwa.commands.info import info_cmd
from cwa.commands.perturb import perturb_cmd
from cwa.commands.plot import plot_cmd
from cwa.commands.rank import rank_cmd
from cwa.commands.run import run_cmd
from cwa.commands.score import score_cmd
from cwa.commands.stability import stability_cmd

app = typer.Typer(
    name="cwa",
    help=(
        "Critical Weight Analysis: find the individual weights of a language model that matter "
        "most, and prove it.\n\n"
        "Stages chain through artifacts: cwa score | cwa rank - --topk 100 | cwa perturb - ; "
        "`cwa run` does everything in one go."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _mapped(fn):
    """Map library errors to one stderr line and an exit code, inside the command, so the
    console script and `typer.testing.CliRunner` behave the same."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cwa.errors import CwaError

        try:
            return fn(*args, **kwargs)
        except CwaError as e:
            if _debug():
                raise
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _debug() -> bool:
    return os.environ.get("CWA_DEBUG", "") not in ("", "0")


for _name, _fn in [
    ("score", score_cmd),
    ("rank", rank_cmd),
    ("control", control_cmd),
    ("perturb", perturb_cmd),
    ("stability", stability_cmd),
    ("plot", plot_cmd),
    ("eval", eval_cmd),
    ("info", info_cmd),
    ("run", run_cmd),
]:
    app.command(_name)(_mapped(_fn))


class Terminated(BaseException):
    """Raised by the SIGTERM handler so `finally` blocks clean up temporary files."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise Terminated()


_INTERRUPTED = "error: interrupted; no partial artifact was left"


def main(argv: list[str] | None = None) -> None:
    from cwa.errors import CwaError

    signal.signal(signal.SIGTERM, _on_sigterm)
    debug = _debug()
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            if rc == 130:  # typer turns KeyboardInterrupt into Exit(130) before we see it
                print(_INTERRUPTED, file=sys.stderr)
            sys.exit(rc)
    except CwaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, Terminated):
        print(_INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if isinstance(e, _parse_errors()):
            _show_parse_error(e)
            sys.exit(e.exit_code)
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (set CWA_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def _parse_errors() -> tuple[type[Exception], ...]:
    """The command-line parser's error classes: click's, and the copy of click that typer
    vendors since 0.2x (`typer._click`, whose errors derive from `TyperException`, not
    from click's), so a bad flag value is a usage error with either."""
    types: list[type[Exception]] = []
    try:
        from typer.exceptions import TyperException

        types.append(TyperException)
    except ImportError:  # pragma: no cover - older typer uses click itself
        pass
    try:
        import click

        types.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _show_parse_error(e: Exception) -> None:
    """One stderr line for a parser error ("Invalid value for '--topk' / '-k': ..."),
    naming the command's help as the fix; `cwa` alone has already printed the help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        return
    msg = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    print(f"error: {msg}{hint}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
