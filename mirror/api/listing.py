"""Discovery: /v2/, tags list, _catalog and the OCI 1.1 referrers API."""

from __future__ import annotations

import json

from aiohttp import web

from mirror.api.common import page, target_for, visible
from mirror.api.dispatch import Params
from mirror.oci.digest import Digest
from mirror.oci.manifest import OCI_INDEX
from mirror.state import ROUTER


async def base(request: web.Request, params: Params) -> web.StreamResponse:
    return web.json_response({})


async def tags_list(request: web.Request, params: Params) -> web.StreamResponse:
    target = target_for(request, params["name"])
    tags, link = page(request, await target.registry.list_tags(target.repo))
    response = web.json_response({"name": params["name"], "tags": tags})
    if link:
        response.headers["Link"] = link
    return response


async def catalog(request: web.Request, params: Params) -> web.StreamResponse:
    repositories, link = page(request, visible(request, await request.app[ROUTER].list_repositories()))
    response = web.json_response({"repositories": repositories})
    if link:
        response.headers["Link"] = link
    return response


async def referrers(request: web.Request, params: Params) -> web.StreamResponse:
    subject = Digest.parse(params["digest"])
    target = target_for(request, params["name"])
    descriptors = await target.registry.referrers(target.repo, subject)
    artifact_type = request.query.get("artifactType")
    headers = {}
    if artifact_type:
        descriptors = [d for d in descriptors if d.artifact_type == artifact_type]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d.to_json() for d in descriptors]}
    return web.Response(body=json.dumps(index).encode(), content_type=OCI_INDEX, headers=headers)
