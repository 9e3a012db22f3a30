from flask import Blueprint, request

from service.app import actor, idempotent, principal, require, services
from service.bundles.archive import Limits, parse_bundle
from service.bundles.ops import get_bundle, serialize_bundle, store_bundle
from service.bundles.schemas import BundleOut
from service.db import transaction
from service.errors import UnsupportedMediaTypeError
from service.openapi import operation
from service.projects.ops import get_project

bp = Blueprint("bundles", __name__)

GZIP_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/x-tar+gzip",
    "application/octet-stream",
}


@bp.post("/projects/<name>/bundles")
@operation(
    "Upload a bundle of revision scripts (.tar.gz)",
    role="deployer",
    raw_body="application/gzip",
    responses={201: BundleOut, 200: BundleOut},
)
def post_bundle(name: str):
    require("deployer")
    config = services().config
    if request.mimetype not in GZIP_TYPES:
        raise UnsupportedMediaTypeError(
            "send the bundle as a .tar.gz with Content-Type: application/gzip",
            {"content_type": request.mimetype},
        )
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
    parsed = parse_bundle(
        request.get_data(cache=False),
        Limits(
            config.max_bundle_bytes,
            config.max_bundle_expanded_bytes,
            config.max_bundle_files,
            config.max_bundle_file_bytes,
        ),
    )

    def create(s) -> tuple[str, int]:
        bundle, created = store_bundle(s, get_project(s, name, principal()), parsed, actor())
        return bundle.digest, 201 if created else 200

    # Upload the same content twice and you get the same bundle anyway; the key
    # also replays the first status (201) and refuses other content under it.
    digest, status, replayed = idempotent(
        f"POST /v1/projects/{name}/bundles", parsed.digest.encode(), create
    )
    with transaction(services().sessions) as s:
        project = get_project(s, name)
        out = serialize_bundle(get_bundle(s, project, digest), project, graph=False)
    return out, status, {"Idempotent-Replayed": "true"} if replayed else {}


@bp.get("/projects/<name>/bundles/<ref>")
@operation(
    "Show a bundle and its revision graph (`ref`: id, prefix or latest)", responses={200: BundleOut}
)
def show_bundle(name: str, ref: str):
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        return serialize_bundle(get_bundle(s, project, ref), project, graph=True)
