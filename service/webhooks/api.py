from flask import Blueprint

from service.db import transaction
from service.jobs.ops import decode_cursor, encode_cursor
from service.openapi import operation
from service.projects.ops import get_project
from service.web import actor, parse_json, parse_query, principal, require, services
from service.webhooks import network
from service.webhooks.ops import (
    check_webhook_url,
    create_webhook,
    delete_webhook,
    get_webhook,
    list_deliveries,
    list_webhooks,
    serialize_delivery,
    serialize_webhook,
)
from service.webhooks.schemas import (
    DeliveryList,
    DeliveryPage,
    WebhookCreate,
    WebhookOut,
    WebhookPage,
)

bp = Blueprint("webhooks", __name__)


@bp.record_once
def _check_allow_networks(state) -> None:
    """A bad RETORT_WEBHOOK_ALLOW_NETWORKS stops the API at start, saying which CIDR."""
    network.parse_networks(state.app.extensions["retort"].config.webhook_allow_networks)


@bp.post("/projects/<name>/webhooks")
@operation(
    "Subscribe a URL to a project's job events",
    role="deployer",
    body=WebhookCreate,
    responses={201: WebhookOut},
)
def post_webhook(name: str):
    require("deployer")
    body = parse_json(WebhookCreate)
    with transaction(services().sessions) as s:
        get_project(s, name, principal())  # a 404 before anything is resolved
    # Resolving the host may take the webhook timeout: not inside a state transaction.
    check_webhook_url(body.url, services().config)
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        hook, secret = create_webhook(s, project, body, services().box, actor())
        return serialize_webhook(hook, project, secret=secret), 201


@bp.get("/projects/<name>/webhooks")
@operation("List a project's webhooks", responses={200: WebhookPage})
def index_webhooks(name: str):
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        return {"webhooks": [serialize_webhook(h, project) for h in list_webhooks(s, project)]}


@bp.get("/projects/<name>/webhooks/<id:webhook_id>")
@operation("Show a webhook", responses={200: WebhookOut})
def show_webhook(name: str, webhook_id: int):
    with transaction(services().sessions) as s:
        project = get_project(s, name, principal())
        return serialize_webhook(get_webhook(s, project, webhook_id), project)


@bp.delete("/projects/<name>/webhooks/<id:webhook_id>")
@operation(
    "Delete a webhook (its deliveries stay on record)", role="deployer", responses={204: None}
)
def remove_webhook(name: str, webhook_id: int):
    require("deployer")
    with transaction(services().sessions) as s:
        delete_webhook(s, get_project(s, name, principal()), webhook_id, actor())
    return "", 204


@bp.get("/projects/<name>/webhooks/<id:webhook_id>/deliveries")
@operation(
    "List a webhook's deliveries, newest first", query=DeliveryList, responses={200: DeliveryPage}
)
def index_deliveries(name: str, webhook_id: int):
    params = parse_query(DeliveryList)
    with transaction(services().sessions) as s:
        hook = get_webhook(s, get_project(s, name, principal()), webhook_id)
        rows, before = list_deliveries(
            s, hook, params.limit, decode_cursor(params.cursor) if params.cursor else None
        )
        return {
            "deliveries": [serialize_delivery(d) for d in rows],
            "next_cursor": encode_cursor(before) if before else None,
        }
