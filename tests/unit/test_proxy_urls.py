"""Proxy URLs: the label shown in their place, and the SDK's Playwright proxy from a grant."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.proxy_urls import proxy_label
from app.sdk.grants import open_proxy
from app.sealing import load_public_key, public_key_text, seal, unseal
from schemas.messages import GrantedProxy, JobGranted, seal_context


@pytest.mark.parametrize(
    ("url", "label"),
    [
        ("http://user:pa55@10.0.0.1:3128", "http://10.0.0.1:3128"),
        ("HTTPS://proxy.example.com", "https://proxy.example.com:443"),
        ("socks5://u:p@[2001:db8::1]:1080/", "socks5://[2001:db8::1]:1080"),
        ("http://proxy.example.com", "http://proxy.example.com:80"),
    ],
)
def test_proxy_label_is_scheme_host_and_port_never_the_credentials(url: str, label: str) -> None:
    assert proxy_label(url) == label


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://proxy.example.com:21", "scheme"),
        ("http://:3128", "host"),
        ("http://proxy.example.com:3128/path", "path"),
        ("http://proxy.example.com:99999", "proxy URL"),
        ("proxy.example.com:3128", "scheme"),
    ],
)
def test_proxy_label_refuses_what_is_no_proxy_url_with_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        proxy_label(url)
    assert "pa55" not in str(refused.value)


class Opener:
    def __init__(self, key: X25519PrivateKey) -> None:
        self.key = key

    def open_sealed(self, sealed: str, context: str) -> bytes:
        return unseal(self.key, sealed, context)


def grant(key: X25519PrivateKey, url: str | None) -> JobGranted:
    now = datetime.now(UTC)
    lease = seal(
        load_public_key(public_key_text(key)), b"L" * 43, seal_context("lease.secret", "j")
    )
    proxy = None
    if url is not None:
        sealed = seal(load_public_key(public_key_text(key)), url.encode(),
                      seal_context("proxy.url", "j"))  # fmt: skip
        proxy = GrantedProxy(label=proxy_label(url), url=sealed)
    return JobGranted(request_id="6f1c1d52-0d6e-4d0e-9d86-6c2f5d6c0a01", job_id="j",  # type: ignore[arg-type]
                      lease_token=1, lease_secret=lease, granted_at=now, lease_expires_at=now,
                      proxy=proxy)  # fmt: skip


def test_proxy_of_a_grant_is_playwrights_proxy_option_with_credentials_decoded() -> None:
    key = X25519PrivateKey.generate()
    opened = open_proxy(Opener(key), grant(key, "http://us%40er:p%3Ass@10.0.0.1:3128"))
    assert opened == {"server": "http://10.0.0.1:3128", "username": "us@er", "password": "p:ss"}
    assert open_proxy(Opener(key), grant(key, "socks5://10.0.0.2:1080")) == {
        "server": "socks5://10.0.0.2:1080"
    }
    assert open_proxy(Opener(key), grant(key, None)) is None
