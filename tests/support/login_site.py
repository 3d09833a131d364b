"""A small login-gated site on loopback, for the real-browser tests of the session helper.

- ``POST /login`` (user, password) sets cookie ``auth`` (A) and redirects to ``/welcome``;
- ``/welcome`` (logged in) sets cookie ``prefs`` (B) and, by script, localStorage ``greeting``;
- ``/members`` answers the members-only page when logged in, else redirects to ``/login``;
- ``/api/me`` is the session check: 200 when logged in, 401 when not;
- ``/logout`` deletes ``auth`` with a past expiry and clears localStorage by script;
- ``/set/NAME`` sets cookie NAME (for collectors that finish with different cookies).

It counts logins, so a test can tell a job that reused the session from one that logged in again.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs

USER, PASSWORD = "reader", "correct horse"
LOGIN_FORM = """<html><body><form method="post" action="/login">
<input name="user"><input name="password" type="password"><button type="submit">Log in</button>
</form></body></html>"""
WELCOME = """<html><body><p id="welcome">welcome</p>
<script>localStorage.setItem("greeting", "hello")</script></body></html>"""
MEMBERS = """<html><body><p id="members">members only</p></body></html>"""
LOGGED_OUT = """<html><body><p id="bye">logged out</p>
<script>localStorage.clear()</script></body></html>"""


class LoginSite:
    """The site, served by a thread on 127.0.0.1 while the ``with`` block runs."""

    def __init__(self) -> None:
        self.logins = 0
        self.tokens: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def __enter__(self) -> LoginSite:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def log_in(self) -> str:
        self.logins += 1
        token = secrets.token_hex(16)
        self.tokens.add(token)
        return token


def _handler(site: LoginSite) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the tests assert on what the browser saw

        def _logged_in(self) -> bool:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            return "auth" in cookie and cookie["auth"].value in site.tokens

        def _send(
            self, status: HTTPStatus, body: str = "", headers: Sequence[tuple[str, str]] = ()
        ) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/login":
                self._send(HTTPStatus.OK, LOGIN_FORM)
            elif path == "/api/me":
                self._send(HTTPStatus.OK if self._logged_in() else HTTPStatus.UNAUTHORIZED)
            elif path in ("/welcome", "/members") and not self._logged_in():
                self._send(HTTPStatus.FOUND, headers=[("Location", "/login")])
            elif path == "/welcome":
                cookie = ("Set-Cookie", "prefs=compact; Path=/; Max-Age=86400; SameSite=Lax")
                self._send(HTTPStatus.OK, WELCOME, [cookie])
            elif path == "/members":
                self._send(HTTPStatus.OK, MEMBERS)
            elif path == "/logout":
                gone = "auth=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
                self._send(HTTPStatus.OK, LOGGED_OUT, [("Set-Cookie", gone)])
            elif path.startswith("/set/"):
                name = path.removeprefix("/set/")
                cookie = ("Set-Cookie", f"{name}=1; Path=/; Max-Age=86400; SameSite=Lax")
                self._send(HTTPStatus.OK, f"<p>{name} set</p>", [cookie])
            else:
                self._send(HTTPStatus.NOT_FOUND)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            if (
                self.path != "/login"
                or form.get("user") != [USER]
                or form.get("password") != [PASSWORD]
            ):
                self._send(HTTPStatus.FORBIDDEN, "wrong user or password")
                return
            cookie = f"auth={site.log_in()}; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax"
            self._send(
                HTTPStatus.SEE_OTHER, headers=[("Set-Cookie", cookie), ("Location", "/welcome")]
            )

    return Handler
