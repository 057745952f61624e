"""A Docker-Hub-like token server for the distribution registry's ``auth.token`` mode.

``TokenServer`` answers ``GET /token?service=..&scope=..`` (and the OAuth2
``POST /token`` form that containerd uses) with ES256 JWTs that distribution
verifies against a self-signed certificate: the JWT header carries the cert in
``x5c``. (distribution 2.8.2 accepts ``x5c`` alone, or ``kid`` alone when kid is
the libtrust key id of a key in the rootcertbundle; we send both.)

Policy, like Docker Hub: anonymous callers may pull anything outside the
private namespaces; the one configured user may pull and push everything; wrong
credentials get 401. Every request is recorded, Authorization header included,
so a test can prove whether credentials were sent.

The server runs in a daemon thread of the test process, so it serves sync tests
and pytest-aiohttp async tests alike (it never touches an event loop).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Creds = tuple[str, str]

DEFAULT_USER = "mirror-test"
DEFAULT_PASSWORD = "s3cret-pa55"
DEFAULT_SERVICE = "registry.docker.io"
DEFAULT_ISSUER = "test-issuer"


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """docker/libtrust's key id: base32 of the first 240 bits of sha256(SPKI DER), in 4-char groups."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass(frozen=True)
class Access:
    type: str
    name: str
    actions: tuple[str, ...]

    def as_claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scope(scope: str) -> Access | None:
    """``repository:NAME:pull,push`` -> Access. NAME may contain ':' (host:port/repo), actions never do."""
    head, sep, actions = scope.rpartition(":")
    if not sep:
        return None
    kind, sep, name = head.partition(":")
    if not sep:
        return None
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received."""

    method: str
    path: str
    service: str | None
    scopes: tuple[str, ...]
    authorization: str | None  # the raw header, or None when the caller was anonymous
    user: str | None  # the Basic (or OAuth2 password-grant) user, if any
    status: int
    granted: tuple[Access, ...]
    time: float = field(default_factory=time.time)

    @property
    def had_credentials(self) -> bool:
        return self.authorization is not None or self.user is not None

    @property
    def basic(self) -> bool:
        return self.authorization is not None and self.authorization.lower().startswith("basic ")


class TokenServer:
    """A Docker Hub style token endpoint on 127.0.0.1, run in a background thread."""

    def __init__(
        self,
        *,
        username: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        private_prefixes: Sequence[str] = ("private/",),
        expires_in: int = 300,
        workdir: Path | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.service = service
        self.issuer = issuer
        self.private_prefixes = tuple(private_prefixes)
        self.expires_in = expires_in
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="token-"))
        self.cert_path = self.workdir / "token-cert.pem"
        # When set, every request is answered with this status (to test upstream auth failures).
        self.fail_with: int | None = None
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._x5c: list[str] = []
        self._kid = ""

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> TokenServer:
        self._make_key_and_cert()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_key_and_cert(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror-test-token-signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # Back-dated so a slightly skewed clock can't make it "not yet valid".
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key = key
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._kid = libtrust_key_id(key.public_key())

    # -- addresses -----------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def creds(self) -> Creds:
        return (self.username, self.password)

    # -- the record ----------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # -- policy and tokens ---------------------------------------------------------

    def is_private(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.private_prefixes)

    def grant(self, wanted: Iterable[Access], authenticated: bool) -> tuple[Access, ...]:
        granted = []
        for access in wanted:
            if access.type == "repository":
                allowed = {"pull", "push", "delete", "*"} if authenticated else (
                    set() if self.is_private(access.name) else {"pull"}
                )
            elif access.type == "registry" and authenticated:
                allowed = {"*"}  # e.g. registry:catalog:*
            else:
                allowed = set()
            actions = tuple(a for a in access.actions if a in allowed)
            # Like Docker Hub, a denied scope is simply left out of the token; the
            # registry then answers 401/403 for the operation that needed it.
            granted.append(Access(access.type, access.name, actions))
        return tuple(granted)

    def issue(self, subject: str, access: Sequence[Access], service: str | None = None) -> str:
        if self._key is None:
            raise RuntimeError("token server not started")
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service or self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a.as_claim() for a in access],
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": self._x5c, "kid": self._kid})

    def check_basic(self, header: str | None) -> tuple[bool, str | None]:
        """(credentials ok, user). A missing header is ok (anonymous); a wrong one is not."""
        if header is None:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        ok = secrets.compare_digest(user, self.username) and secrets.compare_digest(password, self.password)
        return ok, user


def _first(params: dict[str, list[str]], key: str) -> str | None:
    values = params.get(key)
    return values[0] if values else None


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the TokenServer record is the log

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="mirror-test-token"')
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if parts.path != "/token":
                self._reply(404, {"details": "not found"})
                return
            # A scope parameter may itself hold several space-separated scopes.
            scopes = tuple(s for value in query.get("scope", []) for s in value.split())
            service = _first(query, "service")
            authorization = self.headers.get("Authorization")
            ok, user = server.check_basic(authorization)
            self._answer("GET", parts.path, service, scopes, authorization, user, ok)

        def do_POST(self) -> None:
            # containerd's OAuth2 flow: form-encoded grant_type=password|refresh_token.
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            if parts.path != "/token":
                self._reply(404, {"details": "not found"})
                return
            scopes = tuple(s for value in form.get("scope", []) for s in value.split())
            service = _first(form, "service")
            authorization = self.headers.get("Authorization")
            grant = (form.get("grant_type") or [""])[0]
            user: str | None
            if grant == "password":
                user = _first(form, "username") or ""
                password = _first(form, "password") or ""
                ok = secrets.compare_digest(user, server.username) and secrets.compare_digest(
                    password, server.password
                )
            else:
                # A refresh_token or anything else we did not issue: treat as anonymous
                # unless a Basic header says otherwise.
                ok, user = server.check_basic(authorization)
            self._answer("POST", parts.path, service, scopes, authorization, user or None, ok)

        def _answer(
            self,
            method: str,
            path: str,
            service: str | None,
            scopes: tuple[str, ...],
            authorization: str | None,
            user: str | None,
            ok: bool,
        ) -> None:
            def record(status: int, granted: tuple[Access, ...] = ()) -> None:
                server._record(TokenRequest(method, path, service, scopes, authorization, user, status, granted))

            if server.fail_with is not None:
                record(server.fail_with)
                self._reply(server.fail_with, {"details": "failure injected by test"})
                return
            if not ok:
                record(401)
                self._reply(401, {"details": "incorrect username or password"})
                return
            wanted = [a for a in (parse_scope(s) for s in scopes) if a is not None]
            granted = server.grant(wanted, authenticated=user is not None)
            token = server.issue(user or "", granted, service)
            record(200, granted)
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._reply(
                200, {"token": token, "access_token": token, "expires_in": server.expires_in, "issued_at": now}
            )

    return Handler
