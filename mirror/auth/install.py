"""The one call `create_app` makes: with `auth:` on, put access control in front of the dispatcher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from mirror.api.dispatch import Dispatcher
from mirror.config import Config

if TYPE_CHECKING:
    from mirror.auth.middleware import AccessControl

ACCESS_CONTROL: web.AppKey[AccessControl] = web.AppKey("access_control")


def install_access_control(app: web.Application, config: Config, dispatcher: Dispatcher) -> None:
    auth = config.security.auth
    if not auth.enabled:
        return
    # Imported only with auth on: tokens (PyJWT, cryptography) and passwords (bcrypt) cost a server without
    # auth ~0.2 s of start-up.
    from mirror.auth.middleware import TOKEN_PATH, AccessControl
    from mirror.auth.token_endpoint import TokenEndpoint

    control = AccessControl(auth, dispatcher)
    app[ACCESS_CONTROL] = control
    # Innermost: registry_errors (outside it) renders its 401/403s like every other registry error.
    app.middlewares.append(control.middleware)
    endpoint = TokenEndpoint(control)
    app.router.add_get(TOKEN_PATH, endpoint.handle)
    app.router.add_post(TOKEN_PATH, endpoint.handle)

    async def open_accounts(app: web.Application) -> AsyncIterator[None]:
        await control.open(config.storage.path)
        yield

    app.cleanup_ctx.append(open_accounts)
