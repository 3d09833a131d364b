"""`qm console …`: what the web console's users file needs (docs/console.md)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from app.commands.common import fail
from app.console.auth import ROLES, UsersFileError, users_line

console_app = typer.Typer(
    help="The web console (`qm run console`): make a line of its users file.",
    no_args_is_help=True,
)


@console_app.command("hash-password")
def hash_password(
    name: Annotated[str, typer.Argument(help="The user's name (recorded with their actions)")],
    role: Annotated[str, typer.Option(help=f"One of: {', '.join(ROLES)}")] = "viewer",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin")
    ] = False,
) -> None:
    """Print `name:role:scrypt$…` for QM_CONSOLE_USERS_FILE; the password is prompted for
    (hidden, twice) or read from stdin, and never printed."""
    password = (
        sys.stdin.readline().rstrip("\n")
        if password_stdin
        else typer.prompt("password", hide_input=True, confirmation_prompt=True)
    )
    if len(password) < 8:
        raise fail("the password is shorter than 8 characters")
    try:
        typer.echo(users_line(name, role, password))
    except UsersFileError as exc:
        raise fail(str(exc)) from None
