"""The ``softkd`` command: a thin layer that parses arguments and calls the library.

Every error a user can cause prints one line and exits with code 2 (``SOFTKD_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from softkd.errors import SoftKDError, SoftKDWarning


class _Flags:
    """On/off options (--resume, --help, ...) are shown without a value: typer gives them '<bool>',
    as if they took one."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_Flags, typer.core.TyperCommand):
    pass


class _Group(_Flags, typer.core.TyperGroup):
    pass


class _Typer(typer.Typer):
    """A typer app whose group and commands show their on/off options as flags."""

    def __init__(self, **kwargs):
        super().__init__(**{"cls": _Group, **kwargs})

    def command(self, *args, **kwargs):
        return super().command(*args, **{"cls": _Command, **kwargs})


app = _Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
             help="softkd: knowledge distillation with honest baselines.")

# emoji off: a spec like "a:b:c" is text, not an emoji code. Prose wraps at the width (80 when piped);
# a line that names a path is printed with soft_wrap=True, whole, so the path is never cut to copy.
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)

SET_HELP = "Override a config key, e.g. --set method.temperature=2 (repeatable)."


def set_help(example: str) -> str:
    return f"Override a config key, e.g. --set {example} (repeatable)."


def command_group(name: str, help: str, commands: str) -> typer.Typer:
    """A group of subcommands (`softkd cache build`): alone, it prints its help and one error line."""
    group = _Typer(help=help, invoke_without_command=True)

    @group.callback()
    def _needs_a_command(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            console.print(ctx.get_help())
            errors.print(f"error: `softkd {name}` needs a command: {commands}.", markup=False, highlight=False)
            raise typer.Exit(2)

    _needs_a_command.__doc__ = help
    return group


def _print_version(value: bool) -> None:
    if value:
        from softkd import __version__

        console.print(f"softkd {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print softkd's version and exit.")) -> None:
    """softkd: knowledge distillation with honest baselines."""


def _user_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SoftKDError as exc:
            if os.environ.get("SOFTKD_DEBUG") == "1":
                raise
            # An error every process raised together (Distributed.together) is printed once.
            if not getattr(exc, "shared", False) or os.environ.get("RANK", "0") == "0":
                errors.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a full disk or a read-only folder met mid-run: what, where, and what is kept
            if exc.errno not in WRITE_ERRORS or os.environ.get("SOFTKD_DEBUG") == "1":
                raise
            where = f" '{exc.filename}'" if exc.filename else ""
            errors.print(f"error: Cannot write{where}: {exc.strerror}; free some space or choose another folder "
                         "(--out), then run the command again: what was finished and written is kept.",
                         markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # only writes fail so (EACCES may be a read)


def load_user_config(path, overrides):
    """A run config, with its own folder first on the import path, so a 'nets:make_student' model
    in a nets.py beside the config is found without PYTHONPATH (main() adds the current folder,
    as `python -m` does, for every command)."""
    from softkd.config import load_config

    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return load_config(path, overrides)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=errors, transient=True, disable=int(os.environ.get("RANK", "0")) > 0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """softkd's own warnings as one ``warning:`` line (on the main process); others as Python shows them."""
    if issubclass(category, SoftKDWarning):
        if os.environ.get("RANK", "0") == "0":
            errors.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun / accelerate launch the main process reports
        console.quiet = True
    warnings.showwarning = _show_warning
    if os.getcwd() not in sys.path:  # a user's model module in the current folder, as under `python -m`
        sys.path.insert(0, os.getcwd())
    try:
        app()
    finally:
        # The process group the command started goes before the interpreter does (see
        # softkd.train.distributed); without one, nothing to do and torch is not imported.
        if "softkd.train.distributed" in sys.modules:
            sys.modules["softkd.train.distributed"].shutdown()


# The commands, registered on ``app`` in the order `softkd --help` lists them.
from softkd.cli import train, inspection, deliver, data  # noqa: E402, F401
