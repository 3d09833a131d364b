"""Sites: their figures and settings, domain rewrites, webhook (scheme and host); pause, resume."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.console.web import Action, action_form, confirm_then_act, console_state, render, url_id
from app.core.operations import pause_site, resume_site
from app.store import accounts, captures, domains, views


async def site_list(request: Request) -> Response:
    async with console_state(request).db.transaction() as conn:
        rows = await views.site_overview(conn)
        counts = await captures.counts_by_site(conn)
    return render(request, "sites.html", sites=rows, captures=counts)


async def site_page(request: Request) -> Response:
    slug = request.path_params["slug"]
    async with console_state(request).db.transaction() as conn:
        found = await views.site_overview(conn, slug)
        if not found:
            raise HTTPException(404, f"no site {slug!r}")
        rewrites = await domains.list_rewrites(conn, slug)
        rows = await accounts.list_accounts(conn, slug)
        counts = (await captures.counts_by_site(conn)).get(slug, {})
    return render(
        request, "site.html", site=found[0], rewrites=rewrites, accounts=rows, captures=counts
    )


async def pause(request: Request) -> Response:
    slug = request.path_params["slug"]
    back = f"/sites/{url_id(slug)}"
    what = ("Its capacity goes to 0 (kept for the resume): running jobs finish, waiting jobs "
            "wait, nothing is granted until it is resumed.")  # fmt: skip
    return await confirm_then_act(
        request,
        await action_form(request),
        Action(f"Pause site {slug}", what, f"{back}/pause", back),
        lambda tx: pause_site(tx, slug),
        succeeded=lambda row: f"site {slug} paused (its capacity {row['paused_capacity']} is kept)",
        refused=f"site {slug} is paused already (or does not exist)",
    )


async def resume(request: Request) -> Response:
    slug = request.path_params["slug"]
    back = f"/sites/{url_id(slug)}"
    what = "Its capacity comes back; waiting jobs are granted within one reaper sweep."
    return await confirm_then_act(
        request,
        await action_form(request),
        Action(f"Resume site {slug}", what, f"{back}/resume", back),
        lambda tx: resume_site(tx, slug),
        succeeded=lambda row: f"site {slug} resumed with capacity {row['capacity']}",
        refused=f"site {slug} is not paused (or does not exist)",
    )


routes = [
    Route("/sites", site_list, methods=["GET"]),
    Route("/sites/{slug}", site_page, methods=["GET"]),
    Route("/sites/{slug}/pause", pause, methods=["POST"]),
    Route("/sites/{slug}/resume", resume, methods=["POST"]),
]
