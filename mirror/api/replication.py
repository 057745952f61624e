"""`GET /api/replication` (every rule's state, JSON) and `POST /api/replication/<rule>/run` (start it now).

`POST ...?dry_run=1` answers with the plan instead (what would be copied), writing nothing; it is how
`mirror sync --dry-run` asks a running server. `POST ...?wait=1` runs the rule (after the run in progress,
if any) and answers 200 with its report when it has finished: how `mirror sync` runs rules through a
running server, with no polling delay. The run goes on if the client goes away.

Without rules in the config there is no engine (mirror/replication/hosting.py): no rules are listed, and
every rule name is unknown.
"""

from __future__ import annotations

from aiohttp import web

from mirror.errors import NameUnknown
from mirror.replication.hosting import REPLICATION, SERVE_LOCK_OWNED


async def list_rules(request: web.Request) -> web.Response:
    engine = request.app.get(REPLICATION)
    if engine is None:
        return web.json_response({"rules": [], "scheduling": request.app.get(SERVE_LOCK_OWNED, False)})
    return web.json_response({"rules": engine.status(), "scheduling": engine.scheduling})


async def run_rule(request: web.Request) -> web.Response:
    engine = request.app.get(REPLICATION)
    name = request.match_info["rule"]
    if engine is None or name not in engine.rules:
        raise NameUnknown(f"no replication rule named {name[:100]!r}", detail={"rule": name[:100]})
    if request.query.get("dry_run") in ("1", "true"):
        report = await engine.run_rule(name, dry_run=True)
        return web.json_response(report.public())
    if request.query.get("wait") in ("1", "true"):
        return web.json_response((await engine.run_and_wait(name)).public())
    started = engine.trigger(name)
    return web.json_response({"rule": name, "run": started}, status=202)


def add_replication_routes(app: web.Application) -> None:
    app.router.add_get("/api/replication", list_rules)
    app.router.add_post("/api/replication/{rule}/run", run_rule)
