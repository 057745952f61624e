"""An in-process upstream registry for injecting faults the real one cannot produce on demand.

It serves blobs and manifests from dicts, counts every request, can demand Bearer tokens from its own
token endpoint (or HTTP Basic credentials), answers blob GETs with a 307 to a second "CDN" app when told
to, and misbehaves per request path when told to (503, 429, truncated or wrong bytes, slow or stalled
streams, token expiry). The real distribution registry covers normal behaviour in tests/test_real_*.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    """What to do to matching requests; `times` left.

    `kind`: 503, 429 (with `retry_after`), truncate (cut the body halfway), wrong (other bytes, same length),
    empty (`Content-Length: 0` and no body), short (the first half only, with a Content-Length that says so),
    padded (the blob and 10 more bytes, Content-Length included), chunked (the blob in chunked encoding, no
    Content-Length), chunked-padded (that, 10 bytes too long), chunked-truncate (chunked, cut halfway),
    slow (`delay` between 64 KiB pieces), stall (send half the body, then nothing until the client leaves),
    stall-headers (answer nothing until the client leaves), slow-headers (wait `delay`, then answer),
    expire-tokens, refuse-token; on /token also 503 and 429; pad (a JSON answer, the token's included,
    followed by `size` bytes of whitespace: still valid JSON, only bigger).
    """

    kind: str
    times: int = 1_000_000
    retry_after: str = "1"
    delay: float = 0.05
    size: int = 0


@dataclass
class FakeUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)  # (repo, ref) -> body, type
    tags: dict[str, list[str]] = field(default_factory=dict)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults: dict[str, Fault] = field(default_factory=dict)  # substring of path -> fault
    require_token: bool = False
    realm: str | None = None  # defaults to our own /token endpoint
    username: str | None = None
    password: str | None = None
    tokens: set[str] = field(default_factory=set)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    ratelimit_remaining: int | None = None
    blob_delay: float = 0.0
    require_basic: bool = False  # answer `401 WWW-Authenticate: Basic` unless username:password is sent
    redirect_blobs_to: str | None = None  # base URL of cdn_app(): blob GETs get a 307 there
    blob_repos: dict[str, set[str]] = field(default_factory=dict)  # digest -> the only repos that have it
    authorizations: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, header
    cdn_requests: list[dict[str, str]] = field(default_factory=list)  # headers of every CDN request
    bytes_sent: Counter[str] = field(default_factory=Counter)  # digest -> blob bytes written so far
    # JSON listings (tags, referrers) are sent in pieces this big, each on its own (chunked, no length).
    json_piece_bytes: int | None = None
    tags_ignore_n: bool = False  # answer the whole tags list whatever `n` asks (no pagination)
    absolute_links: bool = False  # pagination Links as absolute URLs instead of paths
    # Given a tags request's query string, the Link rel="next" to answer with instead of our own (None: no
    # link): loops, endless lists, links to other hosts.
    tags_next: Callable[[str], str | None] | None = None
    # (repo, subject digest) -> the descriptors of its referrers
    referrers: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    referrers_page_size: int | None = None  # referrers in pages of this many, linked with ?page=
    # Blob GETs with `Range: bytes=N-` get a 206 of the rest (False: the whole blob, as if Range were unknown).
    honour_ranges: bool = True
    blob_ranges: list[str] = field(default_factory=list)  # the Range header of every blob GET ("" = none)
    blob_finished_at: dict[str, float] = field(default_factory=dict)  # digest -> when a GET sent its last byte
    # Manifest GETs and HEADs that arrive over TLS get a 307 to the same path there (see cdn_app()).
    redirect_manifests_to: str | None = None

    # -- content -----------------------------------------------------------------------------------
    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_image(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, bytes]:
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        config_digest = self.add_blob(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": len(config)},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": self.add_blob(layer),
                     "size": len(layer)}
                    for layer in layers
                ],
            }
        ).encode()
        digest = digest_of(manifest)
        self.manifests[(repo, tag)] = (manifest, OCI_MANIFEST)
        self.manifests[(repo, digest)] = (manifest, OCI_MANIFEST)
        self.tags.setdefault(repo, []).append(tag)
        return digest, manifest

    def add_index(self, repo: str, tag: str, children: list[tuple[str, bytes]]) -> tuple[str, bytes]:
        """Tag an image index over child manifests (digest, body) already added with add_image."""
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {"mediaType": OCI_MANIFEST, "digest": child_digest, "size": len(body),
                     "platform": {"architecture": arch, "os": "linux"}}
                    for (child_digest, body), arch in zip(
                        children, ("amd64", "arm64", "s390x", "ppc64le"), strict=False
                    )
                ],
            }
        ).encode()
        digest = digest_of(index)
        self.manifests[(repo, tag)] = (index, OCI_INDEX)
        self.manifests[(repo, digest)] = (index, OCI_INDEX)
        self.tags.setdefault(repo, []).append(tag)
        return digest, index

    def count(self, method: str, fragment: str) -> int:
        return sum(n for (m, path), n in self.requests.items() if m == method and fragment in path)

    # -- the app -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2{tail:.*}", self._v2)
        return app

    def cdn_app(self) -> web.Application:
        """A second server standing in for a blob CDN: serves `/cdn/<digest>` with no auth at all, and
        the manifests `redirect_manifests_to` sends here, by their registry path."""
        app = web.Application()
        app.router.add_get("/cdn/{digest}", self._cdn)
        app.router.add_route("*", "/v2/{repo:.+}/manifests/{reference}", self._cdn_manifest)
        return app

    async def _cdn_manifest(self, request: web.Request) -> web.Response:
        self.cdn_requests.append(dict(request.headers))
        found = self.manifests.get((request.match_info["repo"], request.match_info["reference"]))
        if not found:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, media_type = found
        return web.Response(body=body, headers={"Docker-Content-Digest": digest_of(body), "Content-Type": media_type})

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_requests.append(dict(request.headers))
        digest = request.match_info["digest"]
        return await self._blob(request, digest, self._fault(request.path), {})

    def _basic_expected(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.headers))
        fault = self._fault("/token")
        if fault and fault.kind == "refuse-token":
            return web.Response(status=401)
        if fault and fault.kind == "503":
            return web.Response(status=503)
        if fault and fault.kind == "429":
            return web.Response(status=429, headers={"Retry-After": fault.retry_after})
        if self.username:
            expected = self._basic_expected()
            if "private" in request.query.get("scope", "") and request.headers.get("Authorization") != expected:
                return web.json_response({"errors": [{"code": "DENIED"}]}, status=401)
        token = secrets.token_hex(8)
        self.tokens.add(token)
        return await self._json(request, {"token": token, "expires_in": 300}, {}, fault)

    def _bearer_challenge(self, request: web.Request) -> web.Response:
        path = request.path
        realm = self.realm or f"http://{request.host}/token"
        scope = f"repository:{path.split('/v2/')[1].rsplit('/', 2)[0]}:pull" if path != "/v2/" else ""
        challenge = f'Bearer realm="{realm}",service="fake",scope="{scope}"'
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                 headers={"WWW-Authenticate": challenge})

    def _fault(self, path: str) -> Fault | None:
        for fragment, fault in self.faults.items():
            if fragment in path and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[(request.method, path)] += 1
        self.authorizations.append((request.method, path, request.headers.get("Authorization")))
        headers: dict[str, str] = {}
        if self.ratelimit_remaining is not None:
            headers["ratelimit-limit"] = "100;w=21600"
            headers["ratelimit-remaining"] = f"{self.ratelimit_remaining};w=21600"
        if self.require_token:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                return self._bearer_challenge(request)
        if self.require_basic and request.headers.get("Authorization") != self._basic_expected():
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="fake"'})
        fault = self._fault(path)
        if fault and fault.kind == "503":
            return web.Response(status=503)
        if fault and fault.kind == "429":
            return web.json_response({"errors": [{"code": "TOOMANYREQUESTS"}]}, status=429,
                                     headers={"Retry-After": fault.retry_after, **headers})
        if fault and fault.kind == "expire-tokens":
            self.tokens.clear()  # the token this request carries has just expired
            return self._bearer_challenge(request)
        if fault and fault.kind == "stall-headers":
            await self._until_client_leaves(request, fault.delay)
            return web.Response(status=503)
        if fault and fault.kind == "slow-headers":
            await asyncio.sleep(fault.delay)
        if path in ("/v2/", "/v2"):
            return web.json_response({})
        name, _, kind_ref = path[len("/v2/"):].rpartition("/")
        repo, _, kind = name.rpartition("/")
        if kind == "blobs":
            allowed = self.blob_repos.get(kind_ref)
            if allowed is not None and repo not in allowed:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
            if self.redirect_blobs_to and request.method == "GET" and kind_ref in self.blobs:
                raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/cdn/{kind_ref}", headers=headers)
            return await self._blob(request, kind_ref, fault, headers)
        if kind == "manifests":
            if self.redirect_manifests_to and request.secure:
                raise web.HTTPTemporaryRedirect(f"{self.redirect_manifests_to}{path}", headers=headers)
            found = self.manifests.get((repo, kind_ref))
            if not found:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404, headers=headers)
            body, media_type = found
            headers.update({"Docker-Content-Digest": digest_of(body), "Content-Type": media_type})
            if fault and fault.kind == "wrong":
                body = body.replace(b"amd64", b"arm64") if b"amd64" in body else body + b" "
            return web.Response(body=body, headers=headers)
        if path.endswith("/tags/list"):
            return await self._tags_list(request, path[len("/v2/"):-len("/tags/list")], headers, fault)
        if kind == "referrers":
            return await self._referrers(request, repo, kind_ref, headers, fault)
        return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)

    def _link(self, request: web.Request, target: str) -> str:
        return f'<{f"http://{request.host}{target}" if self.absolute_links else target}>; rel="next"'

    async def _tags_list(self, request: web.Request, repo: str, headers: dict[str, str],
                         fault: Fault | None) -> web.StreamResponse:
        """Distribution's pagination: tags after `last`, at most `n`, and a Link to the rest."""
        if repo not in self.tags:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        tags = sorted(self.tags[repo])
        n, last = request.query.get("n"), request.query.get("last")
        if not self.tags_ignore_n:
            tags = [t for t in tags if last is None or t > last]
            if n is not None and len(tags) > int(n):
                tags = tags[: int(n)]
                headers["Link"] = self._link(request, f"/v2/{repo}/tags/list?n={n}&last={tags[-1]}")
        if self.tags_next is not None:
            headers.pop("Link", None)
            target = self.tags_next(request.query_string)
            if target:
                headers["Link"] = target if target.startswith("<") else self._link(request, target)
        return await self._json(request, {"name": repo, "tags": tags}, headers, fault)

    async def _referrers(self, request: web.Request, repo: str, subject: str, headers: dict[str, str],
                         fault: Fault | None) -> web.StreamResponse:
        found = self.referrers.get((repo, subject), [])
        size = self.referrers_page_size
        if size:
            page = int(request.query.get("page", "0"))
            if (page + 1) * size < len(found):
                headers["Link"] = self._link(request, f"/v2/{repo}/referrers/{subject}?page={page + 1}")
            found = found[page * size : (page + 1) * size]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return await self._json(request, index, {"Content-Type": OCI_INDEX, **headers}, fault)

    async def _json(self, request: web.Request, data: Any, headers: dict[str, str],
                    fault: Fault | None) -> web.StreamResponse:
        """A JSON answer: whole with its length, or in `json_piece_bytes` pieces, padded by a pad fault."""
        body = json.dumps(data).encode() + (b" " * fault.size if fault and fault.kind == "pad" else b"")
        headers = {"Content-Type": "application/json", **headers}
        if not self.json_piece_bytes:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for offset in range(0, len(body), self.json_piece_bytes):
            await response.write(body[offset : offset + self.json_piece_bytes])
            await asyncio.sleep(0.002)  # each piece on its own: the other side sees it arrive alone
        await response.write_eof()
        return response

    async def _blob(
        self, request: web.Request, digest: str, fault: Fault | None, headers: dict[str, str]
    ) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if fault and fault.kind == "wrong":
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        if fault and fault.kind == "empty":
            data = b""
        if fault and fault.kind == "short":
            data = data[: len(data) // 2]
        if fault and fault.kind in ("padded", "chunked-padded"):
            data = data + b"0123456789"
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **headers})
        first = 0
        if request.method == "GET":
            asked = request.headers.get("Range", "")
            self.blob_ranges.append(asked)
            if asked.startswith("bytes=") and asked.endswith("-") and asked[6:-1].isdigit() and self.honour_ranges:
                first = int(asked[6:-1])
                if first >= len(data):
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
                response.set_status(206)
                response.headers["Content-Range"] = f"bytes {first}-{len(data) - 1}/{len(data)}"
        chunked = fault is not None and fault.kind.startswith("chunked")
        if chunked:
            response.enable_chunked_encoding()  # no Content-Length: the size is known only at the end
        else:
            response.content_length = len(data) - first
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        step = 64 * 1024
        for offset in range(first, len(data), step):
            if fault and fault.kind in ("truncate", "chunked-truncate") and offset >= len(data) // 2:
                assert request.transport is not None
                request.transport.close()
                return response
            if fault and fault.kind == "stall" and offset >= len(data) // 2:
                await self._until_client_leaves(request, fault.delay)
                return response
            piece = data[offset : offset + step]
            await response.write(piece)
            self.bytes_sent[digest] += len(piece)
            if (fault and fault.kind == "slow") or self.blob_delay:
                await asyncio.sleep(fault.delay if fault and fault.kind == "slow" else self.blob_delay)
        self.blob_finished_at[digest] = asyncio.get_running_loop().time()
        await response.write_eof()
        return response

    @staticmethod
    async def _until_client_leaves(request: web.Request, limit: float) -> None:
        """Say nothing until the client gives up (or `limit` seconds pass), then let the handler end.

        Polling the transport keeps test teardown fast: a plain long sleep would outlive the client.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.02)


def upstream_config(url: str, **extra: Any) -> dict[str, Any]:
    """The fake as the mirror's default upstream. Layer prefetch is off unless a test turns it on: these
    tests count the upstream requests each client request causes, and prefetch adds blob GETs of its own
    (tests/test_prefetch.py covers it; the real-client tests run with the default, on)."""
    return {"name": "fake.io", "url": url, "default": True, "prefetch": False, **extra}
