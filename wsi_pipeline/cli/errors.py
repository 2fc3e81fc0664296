"""How every ``wsi`` command fails: bad input in one line on stderr and exit code 2.

:class:`Command` turns :class:`~wsi_pipeline.core.errors.InputError` into :class:`BadInput`;
:class:`Command` and :class:`Group` show click's usage errors (an unknown option or command) in
one line with where to find help, instead of click's usage block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from wsi_pipeline.core.errors import InputError

__all__ = ["EXIT_BAD_INPUT", "BadInput", "Command", "Group"]

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """Bad input the user can fix: ``error: MESSAGE`` on stderr, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _UsageError(click.UsageError):
    """A usage error shown as one line, with where to find help, not click's usage block."""

    def show(self, file=None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx else ""
        click.echo(f"error: {self.message}{where}", err=True)


@contextmanager
def _usage_on_one_line() -> Iterator[None]:
    try:
        yield
    except click.UsageError as error:
        raise _UsageError(error.format_message(), error.ctx) from error


class Command(click.Command):
    """A command whose bad-input errors end in one clear line, never a traceback."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as error:
            raise BadInput(str(error)) from error


class Group(click.Group):
    """A command group whose usage errors (an unknown command) end in one line."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(*args, **kwargs)

    def resolve_command(self, *args, **kwargs):
        with _usage_on_one_line():
            return super().resolve_command(*args, **kwargs)
