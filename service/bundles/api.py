from flask import Blueprint, request

from service.app import actor, services
from service.bundles.archive import Limits, parse_bundle
from service.bundles.ops import get_bundle, serialize_bundle, store_bundle
from service.db import transaction
from service.errors import UnsupportedMediaTypeError
from service.projects.ops import get_project

bp = Blueprint("bundles", __name__)

GZIP_TYPES = {
    "application/gzip",
    "application/x-gzip",
    "application/x-tar+gzip",
    "application/octet-stream",
}


@bp.post("/projects/<name>/bundles")
def post_bundle(name: str):
    config = services().config
    if request.mimetype not in GZIP_TYPES:
        raise UnsupportedMediaTypeError(
            "send the bundle as a .tar.gz with Content-Type: application/gzip",
            {"content_type": request.mimetype},
        )
    with transaction(services().sessions) as s:
        project = get_project(s, name)
    parsed = parse_bundle(
        request.get_data(cache=False),
        Limits(
            config.max_bundle_bytes,
            config.max_bundle_expanded_bytes,
            config.max_bundle_files,
            config.max_bundle_file_bytes,
        ),
    )
    with transaction(services().sessions) as s:
        project = get_project(s, name)
        bundle, created = store_bundle(s, project, parsed, actor())
        return serialize_bundle(bundle, project, graph=False), 201 if created else 200


@bp.get("/projects/<name>/bundles/<ref>")
def show_bundle(name: str, ref: str):
    with transaction(services().sessions) as s:
        project = get_project(s, name)
        return serialize_bundle(get_bundle(s, project, ref), project, graph=True)
