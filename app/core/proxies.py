"""Proxies pinned to accounts: a lease's report on its proxy, and moving a blocked proxy's
accounts to healthy ones (docs/policy.md#proxies).

Each runs in the caller's transaction, after the caller locked the proxy's site, and writes its
events to the caller's outbox.
"""

from __future__ import annotations

import structlog

from app.core.transaction import Tx
from app.store import Row, proxies, sites
from schemas.states import ProxyStatus

log = structlog.get_logger()


async def report(tx: Tx, job: Row, *, failed: bool) -> Row | None:
    """The holder of ``job``'s lease says how its proxy did: a failure rests it, the
    ``block_after``-th in a row blocks it and moves its accounts; a success forgets its
    failures in a row. Returns the proxy as changed (None when nothing changed)."""
    proxy = await proxies.report_proxy(tx.conn, lease_token=job["lease_token"], failed=failed)
    if proxy is None or not failed:
        return proxy
    blocked = proxy["status"] == ProxyStatus.BLOCKED
    tx.events.emit(
        "proxy",
        "blocked" if blocked else "failed",
        id=str(proxy["id"]),
        site=proxy["site"],
        status=str(proxy["status"]),
        job_id=job["id"],
        reason=f"{proxy['label']}: {proxy['consecutive_failures']} failure(s) in a row",
    )
    log.warning(
        "proxy_blocked" if blocked else "proxy_failed",
        proxy_id=proxy["id"],
        site=proxy["site"],
        proxy=proxy["label"],
        job_id=job["id"],
        lease_token=job["lease_token"],
        consecutive_failures=proxy["consecutive_failures"],
        rests_until=proxy["available_at"].isoformat(),
    )
    if blocked:
        await repin(tx, proxy)
    return proxy


async def repin(tx: Tx, proxy: Row) -> list[Row]:
    """The accounts of a blocked ``proxy`` pinned to healthy proxies with room (or unpinned, to
    be pinned at their next grant): an ``account.repinned`` event and a log line each."""
    moved = await proxies.repin_accounts(tx.conn, proxy["id"])
    for account in moved:
        to = account["proxy_label"] or "none (pinned again at its next grant)"
        tx.events.emit(
            "account",
            "repinned",
            id=str(account["id"]),
            site=account["site"],
            status=str(account["status"]),
            reason=f"proxy {proxy['label']} blocked; now {to}",
        )
        log.info(
            "account_repinned",
            account_id=account["id"],
            site=account["site"],
            from_proxy=proxy["label"],
            to_proxy=account["proxy_label"],
        )
    return moved


async def block(tx: Tx, site: str, label: str, reason: str) -> Row | None:
    """Block a proxy (ACTIVE -> BLOCKED: an operator's, or a grant's that found its URL no key
    opens) and move its accounts to healthy ones; None when the site has no such ACTIVE proxy."""
    await sites.lock_site(tx.conn, site)  # lock order: site, then its accounts
    proxy = await proxies.set_proxy_status(
        tx.conn, site=site, label=label, target=ProxyStatus.BLOCKED, reason=reason
    )
    if proxy is not None:
        _operator_event(tx, "blocked", proxy, reason)
        await repin(tx, proxy)
    return proxy


async def unblock(tx: Tx, site: str, label: str) -> Row | None:
    """An operator returns a blocked proxy to service (BLOCKED -> ACTIVE, its failures in a row
    forgotten); jobs waiting for a proxy get it within a reaper sweep. None when not BLOCKED."""
    await sites.lock_site(tx.conn, site)
    proxy = await proxies.set_proxy_status(
        tx.conn, site=site, label=label, target=ProxyStatus.ACTIVE
    )
    if proxy is not None:
        _operator_event(tx, "unblocked", proxy, None)
    return proxy


async def remove(tx: Tx, site: str, label: str) -> Row | None:
    """An operator removes a proxy; its accounts are unpinned (pinned again at their next
    grant). None when there is no such proxy."""
    await sites.lock_site(tx.conn, site)
    proxy = await proxies.remove_proxy(tx.conn, site=site, label=label)
    if proxy is not None:
        _operator_event(tx, "removed", proxy, f"{proxy['accounts']} account(s) unpinned")
    return proxy


def _operator_event(tx: Tx, what: str, proxy: Row, reason: str | None) -> None:
    tx.events.emit(
        "proxy", what, id=str(proxy["id"]), site=proxy["site"], status=str(proxy["status"]),
        reason=f"{proxy['label']}: {reason}" if reason else proxy["label"],
    )  # fmt: skip
    log.info(f"proxy_{what}", proxy_id=proxy["id"], site=proxy["site"], proxy=proxy["label"])
