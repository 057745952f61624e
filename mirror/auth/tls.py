"""HTTPS for the listener: one SSLContext whose certificates are loaded again on SIGHUP.

Re-running `load_cert_chain` on the live context changes what new handshakes present; connections
already open keep their session, so a certificate renewal drops nobody. A file that fails to load
leaves the previous certificate in place (and says so in the log). One listener, one scheme: with
`tls:` set the port speaks only HTTPS; there is no plain-HTTP side door and no redirect.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from typing import Any

from aiohttp import web

from mirror.auth.settings import SecurityConfig, TLSConfig

log = logging.getLogger(__name__)


class ReloadableTLS:
    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        if config.client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.reloads = 0
        self.load()

    def load(self) -> None:
        assert self.config.cert is not None and self.config.key is not None
        self.context.load_cert_chain(self.config.cert, self.config.key)
        if self.config.client_ca is not None:
            self.context.load_verify_locations(cafile=self.config.client_ca)

    def reload(self) -> bool:
        try:
            self.load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.config.cert)
        return True


def serve_options(app: web.Application, security: SecurityConfig) -> dict[str, Any]:
    """Keyword arguments for `mirror.api.server.run_app`: the TLS context (with its SIGHUP reload) and the
    HTTP limits."""
    limits = security.http
    options: dict[str, Any] = {
        "max_line_size": limits.max_url_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
        "keepalive_timeout": limits.keepalive_timeout,
        "header_timeout": limits.header_timeout,  # RegistryAppRunner's, not aiohttp's
    }
    if security.tls.enabled:
        tls = ReloadableTLS(security.tls)
        options["ssl_context"] = tls.context

        async def reload_on_sighup(_app: web.Application) -> None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, tls.reload)

        app.on_startup.append(reload_on_sighup)
    return options
