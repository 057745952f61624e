"""The status page at `/`: what an operator without Grafana wants at a glance, rendered on the server.

Every number comes from the same place as `/metrics` (the app's Prometheus registry) or from app-owned
state (pull counts per repository, recent fills, replication rules), so the page and the dashboards can
never disagree. No JavaScript; the page refreshes itself every 15 seconds.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from mirror import __version__
from mirror.api.common import LISTING_FILTER
from mirror.observe.health import HealthChecks
from mirror.observe.requests import PULL_STATS, PullStats
from mirror.replication.hosting import REPLICATION
from mirror.state import CACHE, CONFIG, METRICS, ROUTER

HIT_RESULTS = ("hit", "revalidated")
MISS_RESULTS = ("miss", "joined", "prefetched")


class Samples:
    """A snapshot of the registry's samples, summed over the labels a question leaves open."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._samples: list[tuple[str, dict[str, str], float]] = [
            (sample.name, sample.labels, sample.value) for metric in registry.collect() for sample in metric.samples
        ]

    def total(self, name: str, **labels: str | Iterable[str]) -> float:
        def wanted(found: Mapping[str, str]) -> bool:
            for key, value in labels.items():
                allowed = (value,) if isinstance(value, str) else tuple(value)
                if found.get(key) not in allowed:
                    return False
            return True

        return sum(value for sample_name, found, value in self._samples if sample_name == name and wanted(found))

    def value(self, name: str, **labels: str) -> float | None:
        for sample_name, found, value in self._samples:
            if sample_name == name and all(found.get(k) == v for k, v in labels.items()):
                return value
        return None


def ratio(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "—"


def size(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def ago(when: float | None, now: float) -> str:
    if not when:
        return "never"
    seconds = max(now - when, 0)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def until(when: float | None, now: float) -> str:
    if not when:
        return "—"
    seconds = when - now
    if seconds <= 0:
        return "due"
    return f"in {seconds:.0f} s" if seconds < 90 else f"in {seconds / 60:.0f} min"


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    head: tuple[str, ...]
    rows: Sequence[Sequence[str]]
    empty: str = "nothing yet"

    def render(self) -> str:
        if not self.rows:
            return f"<section><h2>{html.escape(self.title)}</h2><p class=muted>{html.escape(self.empty)}</p></section>"
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.head)
        body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in self.rows)
        return f"<section><h2>{html.escape(self.title)}</h2><table><tr>{head}</tr>{body}</table></section>"


def _badge(ok: bool | None, text: str) -> str:
    kind = "ok" if ok else "bad" if ok is False else "muted"
    return f"<span class='badge {kind}'>{html.escape(text)}</span>"


def _card(label: str, value: str, detail: str = "") -> str:
    extra = f"<div class=detail>{html.escape(detail)}</div>" if detail else ""
    return (
        f"<div class=card><div class=label>{html.escape(label)}</div>"
        f"<div class=value>{html.escape(value)}</div>{extra}</div>"
    )


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:20px;margin:0} header span{opacity:.75;font-size:13px}
main{padding:18px 28px;max-width:1240px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin-bottom:8px}
.card{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 2px #0001}
.label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5b6475}
.value{font-size:26px;font-weight:600} .detail{font-size:12px;color:#5b6475}
section{background:#fff;border-radius:8px;padding:8px 16px 12px;margin-top:14px;box-shadow:0 1px 2px #0001}
h2{font-size:15px;margin:8px 0} table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 10px 5px 0;border-bottom:1px solid #eceef2;font-size:14px;vertical-align:top}
th{font-size:12px;color:#5b6475;font-weight:600} td.num{text-align:right}
.badge{border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.ok{background:#dff5e3;color:#1b6b2e} .bad{background:#fde2e1;color:#a1221b} .muted{color:#7a8191}
.bar{background:#eceef2;border-radius:4px;height:10px;width:100%;margin-top:6px}
.bar>div{background:#3b82f6;height:10px;border-radius:4px}
code{font-size:13px}
"""


class StatusPage:
    def __init__(self, health: HealthChecks) -> None:
        self.health = health

    async def handle(self, request: web.Request) -> web.Response:
        request["endpoint"] = "status"
        app = request.app
        samples = await asyncio.to_thread(Samples, app[METRICS].registry)
        checks = {result.name: result for result in await self.health.run()}
        page = self.render(app, samples, checks, time.time(), visible=request.get(LISTING_FILTER))
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    def render(
        self, app: web.Application, samples: Samples, checks: Mapping[str, Any], now: float,
        visible: Callable[[str], bool] | None = None,
    ) -> str:
        # With access control on, only repositories an anonymous caller may pull are named (the page is open).
        shown: Callable[[str], bool] = visible or (lambda _name: True)
        stats: PullStats = app[PULL_STATS]
        config = app[CONFIG]
        blob_hits = samples.total("mirror_cache_lookups_total", kind="blob", result=HIT_RESULTS)
        blob_misses = samples.total("mirror_cache_lookups_total", kind="blob", result=MISS_RESULTS)
        lookups_hit = samples.total("mirror_cache_lookups_total", result=HIT_RESULTS)
        lookups_all = samples.total("mirror_cache_lookups_total")
        served_cache = samples.total("mirror_served_bytes_total", source="cache")
        fetched = samples.total("mirror_upstream_bytes_total")
        client_pulls = samples.total("mirror_pulls_total")
        upstream_pulls = samples.total("mirror_upstream_requests_total", method="GET", kind="manifest")
        cache = app.get(CACHE)
        cached_bytes = float(cache.cached_bytes) if cache is not None else None
        bound = cache.max_size if cache is not None else None
        cards = [
            _card("blob hit ratio", ratio(blob_hits, blob_hits + blob_misses),
                  f"{blob_hits:.0f} hits, {blob_misses:.0f} misses"),
            _card("all lookups served from cache", ratio(lookups_hit, lookups_all), f"{lookups_all:.0f} lookups"),
            _card("bytes served from cache", size(served_cache), f"{size(fetched)} fetched from upstreams"),
            _card("upstream pulls saved", f"{max(client_pulls - upstream_pulls, 0):.0f}",
                  f"{client_pulls:.0f} client pulls, {upstream_pulls:.0f} manifest GETs upstream"),
            self._cache_card(cached_bytes, bound),
            _card("fills running", f"{samples.total('mirror_fills_in_progress'):.0f}",
                  f"{samples.total('mirror_fill_joins_total'):.0f} joined a running download"),
        ]
        sections = [
            self._upstreams(app, samples, checks),
            self._storage(checks),
            Table("Top repositories by pulls (since start)", ("repository", "pulls"),
                  [(f"<code>{html.escape(name)}</code>", f"{count}")
                   for name, count in stats.top(50) if shown(name)][:10]).render(),
            Table("Recent fills", ("when", "upstream", "repository", "digest", "size", "time", "result"),
                  [(ago(fill.finished_at, now), html.escape(fill.upstream),
                    f"<code>{html.escape(fill.repository)}</code>",
                    f"<code>{html.escape(fill.digest[:19])}…</code>", size(fill.size), f"{fill.seconds:.2f} s",
                    _badge(fill.result == "ok", fill.result)) for fill in stats.recent_fills
                   if shown(f"{fill.upstream}/{fill.repository}")]).render(),
            self._replication(app, now) if visible is None else "",
        ]
        started = ago(stats.started_at, now).replace(" ago", "")
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            "<meta http-equiv=refresh content=15><title>mirror status</title>"
            f"<style>{STYLE}</style></head><body><header><h1>mirror</h1>"
            f"<span>version {html.escape(__version__)}</span>"
            f"<span>listening on {html.escape(str(config.listen))}</span>"
            f"<span>up {html.escape(started)}</span><span><a style='color:#9cc2ff' href='/metrics'>/metrics</a></span>"
            f"</header><main><div class=cards>{''.join(cards)}</div>{''.join(sections)}</main></body></html>"
        )

    @staticmethod
    def _cache_card(cached: float | None, bound: int | None) -> str:
        if cached is None:
            return _card("cache", "—")
        if not bound:
            return _card("cache used", size(cached), "no bound (storage.max_size unset)")
        percent = min(100 * cached / bound, 100)
        return (
            f"<div class=card><div class=label>cache used</div><div class=value>{percent:.0f} %</div>"
            f"<div class=detail>{html.escape(size(cached))} of {html.escape(size(bound))}</div>"
            f"<div class=bar><div style='width:{percent:.1f}%'></div></div></div>"
        )

    @staticmethod
    def _upstreams(app: web.Application, samples: Samples, checks: Mapping[str, Any]) -> str:
        router = app.get(ROUTER)
        rows = []
        for name, upstream in (router.upstreams.items() if router else []):
            client = getattr(upstream.registry, "client", None)
            check = checks.get(f"upstream:{name}")
            if client is not None and client.config.offline:
                state = _badge(None, "offline")
            elif check is None:
                state = _badge(None, "unknown")
            else:
                state = _badge(check.ok, "up" if check.ok else "down")
                if check.error:
                    state += f" <span class=muted>{html.escape(check.error[:120])}</span>"
            remaining = samples.value("mirror_upstream_ratelimit_remaining", upstream=name)
            limit = samples.value("mirror_upstream_ratelimit_limit", upstream=name)
            headroom = f"{remaining:.0f} / {limit:.0f}" if remaining is not None and limit else "—"
            hits = samples.total("mirror_cache_lookups_total", upstream=name, result=HIT_RESULTS)
            total = samples.total("mirror_cache_lookups_total", upstream=name)
            rows.append((
                f"<b>{html.escape(name)}</b><div class=muted>{html.escape(client.config.url if client else '')}</div>",
                state,
                ratio(hits, total),
                f"{samples.total('mirror_upstream_requests_total', upstream=name):.0f}",
                size(samples.total("mirror_upstream_bytes_total", upstream=name)),
                headroom,
            ))
        return Table("Upstreams", ("upstream", "state", "hit ratio", "requests sent", "bytes fetched",
                                   "rate limit left"), rows, "no upstreams: a private registry").render()

    @staticmethod
    def _storage(checks: Mapping[str, Any]) -> str:
        rows = []
        for name in ("storage", "index"):
            check = checks.get(name)
            if check is not None:
                rows.append((html.escape(name), _badge(check.ok, "healthy" if check.ok else "unhealthy"),
                             html.escape(check.error or "")))
        return Table("Storage", ("check", "state", "detail"), rows).render()

    @staticmethod
    def _replication(app: web.Application, now: float) -> str:
        engine = app.get(REPLICATION)
        rules = engine.status() if engine is not None else []
        rows = []
        for rule in rules:
            result = "running" if rule.get("running") else rule.get("result") or "never"
            ok = True if result == "ok" else False if result in ("failed", "partial") else None
            note = ""
            if rule.get("paused"):
                paused = rule["paused"]
                note = f"paused: {paused.get('reason', '')} at {paused.get('upstream', '')}"
            elif rule.get("errors"):
                note = rule["errors"][-1]
            schedule = rule.get("schedule") or (f"every {rule['interval']:.0f} s" if rule.get("interval") else "")
            if rule.get("on_push"):
                schedule = (schedule + ", " if schedule else "") + "on push"
            rows.append((
                f"<b>{html.escape(rule['name'])}</b><div class=muted>{html.escape(str(rule.get('source', '')))}"
                f" → {html.escape(', '.join(rule.get('destinations', [])))}</div>",
                _badge(ok, result), html.escape(schedule or "manual"),
                ago(rule.get("last_run_finished"), now), until(rule.get("next_run"), now),
                f"{rule.get('images', 0)}", size(rule.get("bytes", 0)), html.escape(note[:160]),
            ))
        return Table("Replication", ("rule", "last result", "schedule", "last run", "next run", "images", "bytes",
                                     "note"), rows, "no replication rules configured").render()
