"""Accounts (never a secret): state, holder, rest until, uses, errors; block, unblock, deactivate."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.console.web import (
    Action,
    action_form,
    confirm_then_act,
    console_state,
    render,
    text_field,
)
from app.core.operations import move_account
from app.store import accounts, views
from schemas.states import AccountStatus

# what each action's button says it does, and the state it moves the account to
MOVES = {
    "block": (AccountStatus.BLOCKED, "Block: nobody is granted it until an operator unblocks it."),
    "unblock": (AccountStatus.ACTIVE, "Unblock: back in service now; waiting jobs get it."),
    "deactivate": (AccountStatus.INACTIVE, "Deactivate: out of service until unblocked."),
}


async def account_list(request: Request) -> Response:
    site = request.query_params.get("site") or None
    status = request.query_params.get("status") or None
    async with console_state(request).db.transaction() as conn:
        sites = [row["slug"] for row in await views.site_overview(conn)]
        rows = await accounts.list_accounts(conn, site if site in sites else None)
    if status:
        rows = [row for row in rows if row["status"] == status]
    return render(
        request,
        "accounts.html",
        accounts=rows,
        sites=sites,
        site=site,
        status=status,
        statuses=[s.value for s in AccountStatus],
    )


async def move(request: Request) -> Response:
    action = request.path_params["action"]
    if action not in MOVES:
        raise HTTPException(404, f"no action {action!r}")
    form = await action_form(request)
    site, username = text_field(form, "site", limit=63), text_field(form, "username", limit=320)
    reason = text_field(form, "reason") or "operator"
    target, what = MOVES[action]
    back = f"/accounts?{urlencode({'site': site})}"
    fields = {"site": site, "username": username, "reason": reason}
    return await confirm_then_act(
        request,
        form,
        Action(
            f"{action.capitalize()} {username} of {site}",
            what,
            f"/accounts/{action}",
            back,
            fields=fields,
            reason_field=action == "block",
        ),
        lambda tx: move_account(tx, site=site, username=username, target=target, reason=reason),
        succeeded=lambda row: f"account {username} of {site} is now {row['status']}",
        refused=f"account {username} of {site} does not exist or cannot become {target} from "
        "its status (a held account is its job's until it ends)",
    )


routes = [
    Route("/accounts", account_list, methods=["GET"]),
    Route("/accounts/{action}", move, methods=["POST"]),
]
