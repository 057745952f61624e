"""The endpoint table of the distribution API (OCI distribution-spec end-1 .. end-14, plus _catalog)."""

from __future__ import annotations

from mirror.api import blobs, listing, manifests, uploads
from mirror.api.dispatch import Dispatcher, Endpoint, route


def api_dispatcher() -> Dispatcher:
    # Order matters where patterns overlap: uploads before blobs (`.../blobs/uploads/<id>`).
    return Dispatcher(
        [
            Endpoint("base", route("/v2/?"), {"GET": listing.base}),
            Endpoint("catalog", route("/v2/_catalog"), {"GET": listing.catalog}),
            Endpoint("tags", route("/v2/{name}/tags/list"), {"GET": listing.tags_list}),
            Endpoint(
                "manifest",
                route("/v2/{name}/manifests/{reference}"),
                {
                    "GET": manifests.get_manifest,
                    "HEAD": manifests.get_manifest,
                    "PUT": manifests.put_manifest,
                    "DELETE": manifests.delete_manifest,
                },
            ),
            Endpoint("upload_start", route("/v2/{name}/blobs/uploads/?"), {"POST": uploads.start_upload}),
            Endpoint(
                "upload",
                route("/v2/{name}/blobs/uploads/{upload_id}"),
                {
                    "GET": uploads.upload_status,
                    "PATCH": uploads.patch_upload,
                    "PUT": uploads.put_upload,
                    "DELETE": uploads.cancel_upload,
                },
            ),
            Endpoint(
                "blob",
                route("/v2/{name}/blobs/{digest}"),
                {"GET": blobs.get_blob, "HEAD": blobs.head_blob, "DELETE": blobs.delete_blob},
            ),
            Endpoint("referrers", route("/v2/{name}/referrers/{digest}"), {"GET": listing.referrers}),
        ]
    )
