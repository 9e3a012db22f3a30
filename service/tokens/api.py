from flask import Blueprint

from service.db import transaction
from service.openapi import operation
from service.tokens.ops import create_token, list_tokens, revoke_token, serialize_token
from service.tokens.schemas import TokenCreate, TokenOut, TokenPage
from service.web import actor, parse_json, require, services

bp = Blueprint("tokens", __name__)


@bp.post("/tokens")
@operation(
    "Create an API token (shown once)", role="admin", body=TokenCreate, responses={201: TokenOut}
)
def post_token():
    require("admin", everywhere=True)
    body = parse_json(TokenCreate)
    with transaction(services().sessions) as s:
        token, clear = create_token(s, body, actor())
        return serialize_token(token, clear), 201


@bp.get("/tokens")
@operation("List API tokens (never their secrets)", role="admin", responses={200: TokenPage})
def index_tokens():
    require("admin", everywhere=True)
    with transaction(services().sessions) as s:
        return {"tokens": [serialize_token(t) for t in list_tokens(s)]}


@bp.delete("/tokens/<id:token_id>")
@operation("Revoke an API token", role="admin", responses={204: None})
def delete_token(token_id: int):
    require("admin", everywhere=True)
    with transaction(services().sessions) as s:
        revoke_token(s, token_id, actor())
    return "", 204
