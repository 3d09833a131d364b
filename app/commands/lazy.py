"""Commands imported when used: `qm --help` and `qm sites list` pay only for what they run.

A root group names some of its commands by import path (``"app.commands.sites:sites_app"``) and
one help line; the module is imported the first time the command is looked up to run (or to show
its own help). The group's help lists them from those lines, importing none.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, ClassVar, NamedTuple

import typer
import typer.main
from typer._click import Command, Context, HelpFormatter  # typer bundles its click
from typer.core import TyperCommand, TyperGroup


class Lazy(NamedTuple):
    """A command known by where it lives (``module:attribute``, a Typer app or a function) and the
    help its group lists it with (its own help's first sentence; a test keeps the two equal)."""

    target: str
    help: str


def load(name: str, lazy: Lazy, markup: Any) -> Command:
    """Import ``lazy`` and make it the click command ``name``, as ``add_typer`` or ``command`` would."""
    module, _, attribute = lazy.target.partition(":")
    found = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(rich_markup_mode=markup)  # the root's help style for the loaded command
    if isinstance(found, typer.Typer):
        holder.add_typer(found, name=name)
    else:
        holder.command(name)(found)
    return typer.main.get_group(holder).commands[name]


class LazyCommands(MutableMapping[str, Command]):
    """A group's commands by name: those made already, then the lazy ones, imported when asked for."""

    def __init__(self, made: Mapping[str, Command], lazy: Mapping[str, Lazy], markup: Any) -> None:
        self.made = dict(made)
        self.lazy = dict(lazy)
        self.markup = markup

    def loaded(self, name: str) -> bool:
        return name in self.made

    def __getitem__(self, name: str) -> Command:
        if name not in self.made and name in self.lazy:
            self.made[name] = load(name, self.lazy[name], self.markup)
        return self.made[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self.made[name] = command

    def __delitem__(self, name: str) -> None:
        self.made.pop(name, None)
        self.lazy.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        yield from self.made
        yield from (name for name in self.lazy if name not in self.made)

    def __len__(self) -> int:
        return len(self.made.keys() | self.lazy.keys())


class LazyGroup(TyperGroup):
    """A Typer group whose ``lazy`` commands are imported the first time one is looked up."""

    lazy: ClassVar[Mapping[str, Lazy]] = {}

    def __init__(self, *, commands: Mapping[str, Command] | None = None, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = LazyCommands(commands or {}, self.lazy, self.rich_markup_mode)

    def list_commands(self, ctx: Context) -> list[str]:
        return list(self.commands)  # the names alone: TyperGroup's way looks every command up

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The group's list of commands; a lazy one not yet imported is listed by its help line."""
        commands = self.commands
        assert isinstance(commands, LazyCommands)
        listed = [
            commands[name]
            if commands.loaded(name)
            else TyperCommand(name, help=commands.lazy[name].help)
            for name in self.list_commands(ctx)
        ]
        shown = [command for command in listed if not command.hidden and command.name]
        if shown:
            limit = formatter.width - 6 - max(len(command.name or "") for command in shown)
            with formatter.section("Commands"):
                formatter.write_dl([(c.name or "", c.get_short_help_str(limit)) for c in shown])
