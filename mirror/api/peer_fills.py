"""`GET /_mirror/fills/<upstream>/<digest>`: another cluster node streams a fill this node owns.

Only for nodes holding the cluster secret (`Authorization: Bearer <secret>`); anyone else gets 401 and
learns nothing, not even whether the blob is here. The caller (a follower, mirror/proxy/peers.py) has
already decided that its client's repository may read the blob: the secret vouches for the caller, and
the caller for its client.

A running fill is served as its bytes land (sendfile from the fill's temp file, the last byte held back
until the digest matched, the connection cut if the fill fails: exactly what this node's own clients
get); a stored blob with sendfile; `Range: bytes=N-` on both (a follower resuming).
"""

from __future__ import annotations

from aiohttp import web

from mirror.api.blobs import send_blob_file, stream_blob
from mirror.errors import BlobUnknown, Unauthorized
from mirror.oci.digest import Digest
from mirror.state import CACHE, CLUSTER_FILLS
from mirror.storage.interface import BlobFile


async def serve_peer_fill(request: web.Request) -> web.StreamResponse:
    request["endpoint"] = "cluster_fill"
    cluster = request.app[CLUSTER_FILLS]
    if not cluster.authorised(request.headers.get("Authorization")):
        raise Unauthorized("cluster-internal endpoint: the cluster secret is required")
    upstream = request.match_info["upstream"]
    digest = Digest.parse(request.match_info["digest"])
    with request.app[CACHE].serving(digest):
        fill = cluster.fills.running(upstream, digest)
        if fill is not None:
            await fill.wait_ready()
            return await stream_blob(request, fill)
        stored = await cluster.blobs.stat(digest)
        if stored is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        return await send_blob_file(request, BlobFile(digest, stored.size, stored.path))
