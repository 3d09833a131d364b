"""The web console's settings (``QM_CONSOLE_*``, docs/console.md): a section of
``app.settings.Settings``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings

# the fewest characters of the console's session key and of its proxy's secret
CONSOLE_SECRET_CHARS = 32


class ConsoleSettings(BaseSettings):
    """Where the console listens, who may sign in and how its sessions are kept."""

    # --- web console (`qm run console`, docs/console.md) ----------------------------------
    console_host: str = Field(
        "127.0.0.1",
        description="Address the web console listens on: loopback by default (put an "
        "authenticating proxy or a tunnel in front to reach it from elsewhere).",
    )
    console_port: int = Field(
        8090, ge=0, le=65535, description="Port of the web console (0: a free port, logged)."
    )
    console_token: SecretStr | None = Field(
        None, description="Operator token: who signs in with it gets the operator role."
    )
    console_users_file: str | None = Field(
        None,
        description="File of console users, one `name:role:scrypt-hash` a line "
        "(`qm console hash-password NAME` writes one).",
    )
    console_trusted_header: str | None = Field(
        None,
        description="Header an authenticating proxy sets to the signed-in user's name (e.g. "
        "X-Forwarded-User); only set it when every request comes through that proxy.",
    )
    console_trusted_proxy_secret: SecretStr | None = Field(
        None,
        validate_default=True,
        description="Secret the authenticating proxy sends in X-Qm-Proxy-Secret with every "
        "request (at least 32 characters; needed with QM_CONSOLE_TRUSTED_HEADER, which is "
        "honoured only on a request carrying it).",
    )
    console_trusted_role: Literal["viewer", "operator"] = Field(
        "viewer",
        description="Role of a user the trusted header names (unless the users file says).",
    )
    console_session_secret: SecretStr | None = Field(
        None,
        description="Key that signs the console's session cookie, at least 32 characters "
        "(unset: a new one each start, which signs everybody out on a restart).",
    )
    console_secure_cookie: bool = Field(
        False, description="Send the session cookie over HTTPS only (set it behind TLS)."
    )
    console_refresh_seconds: float = Field(
        2.0, gt=0, le=60, description="Seconds between refreshes of the live overview."
    )

    @field_validator("console_session_secret", "console_trusted_proxy_secret")
    @classmethod
    def _long_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        # a short key would let anyone who guesses it forge a session as any user
        if secret is not None and len(secret.get_secret_value()) < CONSOLE_SECRET_CHARS:
            raise ValueError(f"takes a secret of at least {CONSOLE_SECRET_CHARS} characters")
        return secret

    @field_validator("console_trusted_proxy_secret")
    @classmethod
    def _proxy_secret_with_header(
        cls, secret: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        # without it, anybody who reaches the console's port could name themselves in the header
        if secret is None and info.data.get("console_trusted_header"):
            raise ValueError(
                "takes a secret the proxy sends in X-Qm-Proxy-Secret when "
                "QM_CONSOLE_TRUSTED_HEADER is set"
            )
        return secret
