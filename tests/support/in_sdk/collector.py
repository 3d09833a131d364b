"""A collector run by the SDK's own virtual environment (``make sdk``), which holds the client
alone: one job through ``QuartermasterClient`` — start with an account, a heartbeat, a finish —
then one JSON line of what it got (the account's secret only as its SHA-256).

    python -I collector.py BOOTSTRAP TOPIC_PREFIX SITE
"""

import asyncio
import hashlib
import json
import sys

import app.sdk
from app.sdk import QuartermasterClient


async def main(bootstrap: str, prefix: str, site: str) -> dict[str, object]:
    async with QuartermasterClient(bootstrap, topic_prefix=prefix, collector="sdk-alone") as client:
        async with client.job(site=site, lease_seconds=60, timeout=30) as job:
            assert job.account is not None, "granted without an account"
            granted_until = job.lease_expires_at
            extended_until = await job.heartbeat(120)
            got: dict[str, object] = {
                "sdk": app.sdk.__file__,
                "server_modules_loaded": [
                    m for m in ("app.settings", "sqlalchemy") if m in sys.modules
                ],
                "username": job.account.username,
                "secret_sha256": hashlib.sha256(
                    job.account.secret.get_secret_value().encode()
                ).hexdigest(),
                "lease_token": job.lease_token,
                "extended": extended_until > granted_until,
            }
        got["status"] = job.status
        return got


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))), flush=True)
