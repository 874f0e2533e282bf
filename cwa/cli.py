"""The `cwa` command line: wires the subcommands and maps errors to one-line messages.

Library errors (`cwa.errors`) become one line on stderr with exit code 2 (usage) or 1
(run-time failure); any other exception escaping a command becomes one line too
("error: TypeName: message"), exit code 1. Set CWA_DEBUG=1 (or true/yes/on) for the
traceback (`cwa.console.debug_enabled`). SIGTERM and Ctrl-C (`cwa.stop`) raise at once
and leave a pending-stop flag that the long loops check, so an interrupted stage removes
its temporary file and exits 130 with one line.
"""

from __future__ import annotations

import functools
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
from cwa.console import debug_enabled
from cwa.stop import Terminated, handling

__all__ = ["Terminated", "app", "main"]

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



def _one_line(text) -> str:
    """A message's lines joined by spaces (blank lines dropped)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error_line(e: BaseException) -> str:
    """The one stderr line for an exception: a CwaError's message, else the type and the
    message of an unexpected one (multi-line messages, e.g. torch's, are joined)."""
    from cwa.errors import CwaError

    if isinstance(e, CwaError):
        return f"error: {_one_line(e)}"
    msg = _one_line(e)
    what = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return f"error: {what} (set CWA_DEBUG=1 for the traceback)"


def _passthrough() -> tuple[type[BaseException], ...]:
    """Exceptions a command may raise on purpose (exit codes, aborts, parser errors; typer's
    and click's `Exit`/`Abort` derive from RuntimeError), and a broken stdout pipe, which
    typer ends quietly with exit code 1 (`cwa score | head -0`)."""
    types: list[type[BaseException]] = [typer.Exit, typer.Abort, BrokenPipeError, *_parse_errors()]
    try:
        import click

        types += [click.exceptions.Exit, click.exceptions.Abort]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _mapped(fn):
    """Map errors to one stderr line and an exit code, inside the command, so the console
    script and `typer.testing.CliRunner` behave the same: a CwaError exits with its code,
    any other exception with 1 (CWA_DEBUG on: the exception propagates, traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cwa.errors import CwaError

        try:
            return fn(*args, **kwargs)
        except CwaError as e:
            if debug_enabled():
                raise
            print(_error_line(e), file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        except _passthrough():
            raise
        except Exception as e:
            if debug_enabled():
                raise
            print(_error_line(e), file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


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


_INTERRUPTED = "error: interrupted; no partial artifact was left"


def main(argv: list[str] | None = None) -> None:
    """The console script: SIGTERM / Ctrl-C handlers (`cwa.stop.handling`) around the app."""
    with handling():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    from cwa.errors import CwaError

    debug = debug_enabled()
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            if rc == 130:  # typer turns KeyboardInterrupt into Exit(130) before we see it
                print(_INTERRUPTED, file=sys.stderr)
            sys.exit(rc)
    except CwaError as e:
        if debug:
            raise
        print(_error_line(e), file=sys.stderr)
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
        print(_error_line(e), file=sys.stderr)
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
