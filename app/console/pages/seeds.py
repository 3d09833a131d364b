"""Seeds of a site: due, assigned, disabled (with the reason)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.console.web import console_state, render
from app.store import seeds, views
from schemas.states import SeedStatus

LIMIT = 200


async def seed_list(request: Request) -> Response:
    query = request.query_params
    status = query.get("status") or None
    due = query.get("due") == "1"
    if status is not None and status not in SeedStatus.__members__:
        raise HTTPException(400, f"no seed status {status!r}")
    async with console_state(request).db.transaction() as conn:
        sites = [row["slug"] for row in await views.site_overview(conn)]
        site = query.get("site") or (sites[0] if sites else None)
        rows = []
        if site is not None and site in sites:
            rows = await seeds.list_seeds(
                conn, site, status=SeedStatus(status) if status else None, due=due, limit=LIMIT
            )
    return render(request, "seeds.html", seeds=rows, sites=sites, site=site, status=status,
                  due=due, statuses=list(SeedStatus.__members__))  # fmt: skip


routes = [Route("/seeds", seed_list, methods=["GET"])]
