from flask import Blueprint, request

from service.bundles.archive import Limits, parse_bundle
from service.bundles.ops import (
    get_bundle,
    list_bundles,
    promote_bundle,
    serialize_bundle,
    store_bundle,
    upload_notices,
)
from service.bundles.schemas import BundleList, BundleOut, BundlePage, BundleUpload
from service.db import transaction
from service.errors import UnsupportedMediaTypeError
from service.openapi import operation
from service.projects.ops import get_project
from service.web import actor, idempotent, parse_query, principal, require, services, validate

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
    query=BundleUpload,
    responses={201: BundleOut, 200: BundleOut},
)
def post_bundle(name: str):
    """The archive may be shaped like its repository: `versions_path` names the folder of
    revision scripts, `python_path` the folders put on the runner's import path (each must
    hold .py files). The answer's `notices` say what Retort does not use (env.py,
    alembic.ini's sqlalchemy.url) and where they set something the project's settings differ
    from. See docs/bundles.md."""
    require("deployer")
    config = services().config
    if request.mimetype not in GZIP_TYPES:
        raise UnsupportedMediaTypeError(
            "send the bundle as a .tar.gz with Content-Type: application/gzip",
            {"content_type": request.mimetype},
        )
    shape = _shape()
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
        versions_path=shape.versions_path,
        python_path=shape.python_path,
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
        notices = upload_notices(parsed, project)
        out = serialize_bundle(get_bundle(s, project, digest), project, False, notices)
    return out, status, {"Idempotent-Replayed": "true"} if replayed else {}


def _shape() -> BundleUpload:
    """The upload's query: `python_path` repeated, comma-separated, or both."""
    data: dict = {}
    for key in request.args:
        values = request.args.getlist(key)
        if key == "python_path":
            data[key] = [p.strip() for v in values for p in v.split(",") if p.strip()]
        else:
            data[key] = values[-1] if len(values) == 1 else values
    return validate(BundleUpload, data)


@bp.get("/projects/<name>/bundles")
@operation(
    "List a project's bundles, the last pushed or promoted first",
    query=BundleList,
    responses={200: BundlePage},
)
def index_bundles(name: str):
    """`latest: true` marks the project's latest bundle (what a job without `bundle` runs):
    the one pushed or promoted last. Pass `next_cursor` back as `cursor` for the next page."""
    params = parse_query(BundleList)
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        bundles, cursor = list_bundles(s, project, params.limit, params.cursor)
        return {"bundles": bundles, "next_cursor": cursor}


@bp.get("/projects/<name>/bundles/<ref>")
@operation(
    "Show a bundle and its revision graph (`ref`: id, prefix or latest)", responses={200: BundleOut}
)
def show_bundle(name: str, ref: str):
    """`ref`: `latest`, the bundle's id (its sha256) or a unique prefix of at least 8 hex
    characters; a shorter one is a 422 `invalid_bundle_ref`, one several bundles share a 422
    `ambiguous_bundle` listing them (`details.candidates`)."""
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        return serialize_bundle(get_bundle(s, project, ref), project, graph=True)


@bp.post("/projects/<name>/bundles/<ref>/promote")
@operation(
    "Make a bundle the project's latest (what a job without `bundle` runs)",
    role="deployer",
    responses={200: BundleOut},
)
def promote(name: str, ref: str):
    """Roll back to (or forward to) a bundle pushed before: jobs without `bundle` run it from
    now on. Audited as `bundle.promoted` (`from`, `to`, `reason`); promoting the latest
    changes nothing and records nothing."""
    require("deployer")
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        bundle, _ = promote_bundle(s, project, ref, actor())
        return serialize_bundle(bundle, project, graph=False)
