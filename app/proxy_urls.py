"""Proxy URLs: what an operator adds, and the label (scheme, host, port) shown in their place."""

from __future__ import annotations

from urllib.parse import urlsplit

# the schemes Playwright's ``proxy`` option takes
SCHEMES = {"http": 80, "https": 443, "socks5": 1080}


def proxy_label(url: str) -> str:
    """``scheme://host:port`` of a proxy URL, never its credentials; ValueError for no proxy URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("not a proxy URL (scheme://[user:password@]host:port)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"a proxy URL's scheme is one of {', '.join(sorted(SCHEMES))}")
    if not parts.hostname:
        raise ValueError("a proxy URL names a host (scheme://[user:password@]host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port or SCHEMES[scheme]}"
