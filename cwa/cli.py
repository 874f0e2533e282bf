"""The `cwa` command line: wires the subcommands and maps errors to one-line messages.

Library errors (`cwa.errors`) become one line on stderr with exit code 2 (usage) or 1
(run-time failure); any other exception escaping a command becomes one line too
("error: TypeName: message"), exit code 1. Set CWA_DEBUG=1 (or true/yes/on) for the
traceback (`cwa.console.debug_enabled`). SIGTERM and Ctrl-C (`cwa.stop`) raise at once
and leave a pending-stop flag that the long loops check, so an interrupted stage removes
its temporary file and exits with one line: 143 after SIGTERM, 130 after Ctrl-C (128 +
the signal's number). A reader that closes the pipe early (`cwa --help | head -1`) ends
the command quietly with exit code 0: what was asked for was done, only its output went
unread.

Global options (before the subcommand): `--version`, `-q/--quiet` (no progress or
info lines on stderr; errors still show), and typer's `--install-completion` /
`--show-completion`. Help is click's plain layout, at most 80 columns wide, so option
names and defaults are never cut (rich's option tables cut them at 80 columns), and
the examples of each command keep one command per line (`_help_text`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import signal
import sys
from typing import Annotated

import typer

from cwa.commands.compare import compare_cmd
from cwa.commands.control import control_cmd
from cwa.commands.eval import eval_cmd
from cwa.commands.info import info_cmd
from cwa.commands.perturb import perturb_cmd
from cwa.commands.plot import plot_cmd
from cwa.commands.rank import rank_cmd
from cwa.commands.run import run_cmd
from cwa.commands.score import score_cmd
from cwa.commands.stability import stability_cmd
from cwa.commands.superweights import superweights_cmd
from cwa.console import debug_enabled, set_quiet
from cwa.stop import Terminated, exit_code, handling

__all__ = ["StdoutClosed", "Terminated", "app", "main"]

HELP_WIDTH = 80  # columns of `--help`, whatever the terminal's width

app = typer.Typer(
    name="cwa",
    help=(
        "Critical Weight Analysis: find the individual weights of a language model that matter "
        "most, and prove it.\n\n"
        "Stages chain through artifacts: cwa score | cwa rank - --topk 100 | cwa perturb - ; "
        "`cwa run` does everything in one go."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": HELP_WIDTH},
)


def version() -> str:
    """cwa's version: the installed distribution's, else `cwa.__version__`."""
    import importlib.metadata as md

    try:
        return md.version("cwa")
    except md.PackageNotFoundError:
        import cwa

        return getattr(cwa, "__version__", "unknown")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cwa {version()}")
        raise typer.Exit()


@app.callback()
def _global_options(
    show_version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print cwa's version and exit."),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress or info lines on stderr (errors still show)."),
    ] = False,
) -> None:
    """Options of every command: give them before the command (`cwa -q run`)."""
    set_quiet(quiet)


# An example paragraph (its own 2-space indent included) is printed 2 columns in, and
# click keeps the last 2 columns of HELP_WIDTH free: what fits in this many stays as written.
_EXAMPLE_WIDTH = HELP_WIDTH - 4


def _help_text(fn) -> str:
    """A command's docstring for `--help`: prose paragraphs are rewrapped by click; each
    paragraph after "Examples:" is one shell command, kept unwrapped (click's `\\b`) and
    broken, where it is longer than the help is wide, with backslash continuations
    between whole options (`--topk 100` stays together), so it can still be pasted."""
    doc = inspect.getdoc(fn) or ""
    head, sep, tail = doc.partition("\nExamples:\n")
    if not sep:
        return doc
    examples = [p for p in re.split(r"\n\s*\n", tail) if p.strip()]
    return head + "\nExamples:\n\n" + "\n\n".join("\b\n" + _example(p) for p in examples)


def _short_help(fn) -> str:
    """A command's line in `cwa --help`, whole (click would cut it at 45 characters): its
    docstring's first sentence without the "; print ..." clause of the stdout contract,
    cut at its first colon when still longer than 90 characters."""
    first = (inspect.getdoc(fn) or "").split("\n\n")[0]
    sentence = re.split(r"(?<=\.)\s", " ".join(first.split()), maxsplit=1)[0].rstrip(".")
    sentence = sentence.split("; print")[0]
    if len(sentence) > 90 and ": " in sentence:
        sentence = sentence.split(": ")[0]
    return sentence + "."


def _example(paragraph: str) -> str:
    """One example for `--help`: as written when it fits on a line; else its trailing
    comment on a line of its own above it, then the command, broken before whole options
    with backslash continuations."""
    paragraph = paragraph.strip("\n").rstrip()
    text = " ".join(paragraph.split("\n")).strip()
    m = re.search(r"\s{2,}(#.*)$", text)  # a trailing comment, set off by two spaces or more
    comment = m.group(1) if m else ""
    command = " ".join((text[: m.start()] if m else text).split())
    if len(paragraph) <= _EXAMPLE_WIDTH and "\n" not in paragraph:
        return paragraph  # fits: as written (its comment's alignment too)
    lines = [f"  {comment}"] if comment else []
    units: list[str] = []  # an option with its value is one unit: never split
    for tok in command.split(" "):
        if units and units[-1].startswith("-") and " " not in units[-1] and not tok.startswith("-") and tok != "|":
            units[-1] += " " + tok
        else:
            units.append(tok)
    line = "  " + units[0]
    for u in units[1:]:
        if len(line) + 1 + len(u) + 2 > _EXAMPLE_WIDTH:  # room for " \\"
            lines.append(line + " \\")
            line = "      " + u
        else:
            line += " " + u
    lines.append(line)
    return "\n".join(lines)


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
    ("superweights", superweights_cmd),
    ("plot", plot_cmd),
    ("eval", eval_cmd),
    ("info", info_cmd),
    ("run", run_cmd),
    ("compare", compare_cmd),
]:
    app.command(_name, help=_help_text(_fn), short_help=_short_help(_fn))(_mapped(_fn))


_INTERRUPTED = "error: interrupted; no partial artifact was left"


class StdoutClosed(BaseException):
    """stdout's reader has gone (a closed pipe). A BaseException, so that no handler in
    typer, click or rich (which turn a broken pipe into exit code 1) catches it first."""


class _GuardedStdout:
    """`sys.stdout` while the console script runs: a write or flush that meets a closed
    pipe raises `StdoutClosed`; everything else is the real stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, s):
        try:
            return self._stream.write(s)
        except BrokenPipeError:
            raise StdoutClosed() from None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise StdoutClosed() from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null, so that the interpreter's own flush
    of what is still buffered succeeds at exit (the recipe of Python's `signal` docs)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def main(argv: list[str] | None = None) -> None:
    """The console script: SIGTERM / Ctrl-C handlers (`cwa.stop.handling`) around the app;
    a closed stdout pipe ends it quietly with exit code 0 (an error's code is kept)."""
    real = sys.stdout
    with handling():
        sys.stdout = _GuardedStdout(real) if real is not None else real
        try:
            _main(argv)
            sys.stdout.flush()
        except StdoutClosed:
            _silence(real)
            sys.exit(0)
        except SystemExit:
            try:
                sys.stdout.flush()
            except StdoutClosed:
                _silence(real)
            raise
        finally:
            sys.stdout = real
            set_quiet(False)


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
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        sys.exit(exit_code(signal.SIGINT))
    except Terminated:
        print(_INTERRUPTED, file=sys.stderr)
        sys.exit(exit_code(signal.SIGTERM))
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
