"""The PostgreSQL URLs the settings accept: any PostgreSQL driver's form, read as the project's
driver (asyncpg), with only the query parameters asyncpg takes."""

from __future__ import annotations

import re
from urllib.parse import unquote

# the driver every process uses; URLs of another PostgreSQL driver are read as this one
DRIVER = "postgresql+asyncpg"
_POSTGRES_SCHEME = re.compile(r"^(postgres|postgresql)(\+[A-Za-z0-9_]+)?://", re.IGNORECASE)
# libpq's names (what people paste) of what asyncpg spells otherwise
_LIBPQ_NAMES = {"sslmode": "ssl"}
# the URL query parameters asyncpg's connect takes as text (through SQLAlchemy); any other one
# (libpq's application_name, connect_timeout ...) would fail every connection at run time, so it is
# refused when the settings are read
_ASYNCPG_PARAMETERS = frozenset(
    {"host", "ssl", "passfile", "target_session_attrs", "prepared_statement_cache_size"}
)


def asyncpg_url(url: str) -> str:
    """``url`` with the project's driver: ``postgres://``, ``postgresql://`` and
    ``postgresql+<driver>://`` become ``postgresql+asyncpg://``; query parameters are kept
    (``sslmode`` under asyncpg's name, ``ssl``)."""
    found = _POSTGRES_SCHEME.match(url)
    if found is None:
        raise ValueError(
            "takes a PostgreSQL URL such as postgresql://user:password@host:5432/database"
        )
    rest, _, query = url[found.end() :].partition("?")
    if rest.partition("/")[0].count("@") > 1:  # the host would be read from inside the password
        raise ValueError("has an '@' in its user name or password: write it as %40")
    if not query:
        return f"{DRIVER}://{rest}"
    parts = [part.partition("=") for part in query.split("&") if part]
    names = [_LIBPQ_NAMES.get(unquote(key), unquote(key)) for key, _, _ in parts]
    unknown = sorted(set(names) - _ASYNCPG_PARAMETERS)
    if unknown:
        raise ValueError(
            f"has query parameters the asyncpg driver does not take: {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(_ASYNCPG_PARAMETERS))}; sslmode is read as ssl)"
        )
    if len(set(names)) < len(names):
        raise ValueError("names a query parameter twice (sslmode is read as ssl)")
    kept = "&".join(f"{name}{eq}{value}" for name, (_, eq, value) in zip(names, parts, strict=True))
    return f"{DRIVER}://{rest}?{kept}"
