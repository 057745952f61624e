"""GET / HEAD / PUT / DELETE /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import web

from mirror.api.common import TAG_MOVE_CHECK, content_headers, read_limited, target_for
from mirror.api.dispatch import Params
from mirror.oci.digest import Digest, looks_like_digest
from mirror.oci.names import validate_tag
from mirror.state import CONFIG


def checked_reference(reference: str) -> str:
    """A reference is a digest (400 DIGEST_INVALID if malformed) or a tag (400 TAG_INVALID)."""
    if looks_like_digest(reference):
        Digest.parse(reference)
    else:
        validate_tag(reference)
    return reference


async def get_manifest(request: web.Request, params: Params) -> web.StreamResponse:
    reference = checked_reference(params["reference"])
    target = target_for(request, params["name"])
    if request.method == "HEAD":
        info = await target.registry.stat_manifest(target.repo, reference)
        response = web.StreamResponse(headers=content_headers(info.digest, info.media_type))
        response.content_length = info.size
        await response.prepare(request)
        await response.write_eof()
        return response
    manifest = await target.registry.get_manifest(target.repo, reference)
    return web.Response(body=manifest.body, headers=content_headers(manifest.digest, manifest.media_type))


async def put_manifest(request: web.Request, params: Params) -> web.StreamResponse:
    reference = checked_reference(params["reference"])
    target = target_for(request, params["name"])
    body = await read_limited(request, request.app[CONFIG].limits.manifest_bytes)
    result = await target.registry.put_manifest(
        target.repo, reference, body, request.headers.get("Content-Type"), on_tag_move=request.get(TAG_MOVE_CHECK)
    )
    headers = {
        "Location": f"/v2/{params['name']}/manifests/{result.digest}",
        "Docker-Content-Digest": str(result.digest),
        "Content-Length": "0",
    }
    if result.subject is not None:
        headers["OCI-Subject"] = str(result.subject)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request, params: Params) -> web.StreamResponse:
    reference = checked_reference(params["reference"])
    target = target_for(request, params["name"])
    await target.registry.delete_manifest(target.repo, reference)
    return web.Response(status=202, headers={"Content-Length": "0"})
