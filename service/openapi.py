"""The OpenAPI 3.1 document, generated from the routes and the schemas they validate with.

Each view declares its contract with @operation: the pydantic model its body
and query are parsed with (the same class `parse_json`/`parse_query` use), and
the model of each success answer. The document is built from Flask's URL map
and those classes at startup, so it cannot drift from what the server does.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from service.projects.schemas import Out

_ARG = re.compile(r"<(?:(?P<conv>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")
REF = "#/components/schemas/{model}"


class ErrorBody(Out):
    code: str
    message: str
    details: Any


class ErrorDocument(Out):
    """Every refusal: a stable `code`, a human `message`, and `details` (e.g. the field)."""

    error: ErrorBody


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    ok: bool


def operation(
    summary: str,
    *,
    role: str = "viewer",
    body: type[BaseModel] | None = None,
    raw_body: str | None = None,
    query: type[BaseModel] | None = None,
    responses: dict[int, type[BaseModel] | str | None],
    description: str | None = None,
) -> Callable:
    """Declare a view's contract for the OpenAPI document (see module docstring).

    `responses` maps a success status to its model, to a media type for
    non-JSON answers (event streams), or to None for an empty answer.
    """

    def mark(view: Callable) -> Callable:
        view._openapi = {  # type: ignore[attr-defined]
            "summary": summary,
            "description": description or inspect.cleandoc(view.__doc__ or "") or None,
            "role": role,
            "body": body,
            "raw_body": raw_body,
            "query": query,
            "responses": responses,
        }
        return view

    return mark


def build_spec(app: Flask, version: str) -> dict[str, Any]:
    """Build the document from the app's routes and their declared schemas."""
    found = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        meta = getattr(app.view_functions[rule.endpoint], "_openapi", None)
        if meta is None:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((rule, method.lower(), meta))

    inputs = {m for _, _, meta in found for m in (meta["body"], meta["query"]) if m}
    outputs = {
        m
        for _, _, meta in found
        for m in meta["responses"].values()
        if isinstance(m, type) and issubclass(m, BaseModel)
    } | {ErrorDocument}
    pairs = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
    pairs += [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
    refs, top = models_json_schema(pairs, ref_template=REF)
    components = top.get("$defs", {})

    paths: dict[str, dict[str, Any]] = {}
    for rule, method, meta in found:
        path = _ARG.sub(lambda m: "{" + m.group("name") + "}", rule.rule)
        op: dict[str, Any] = {
            "operationId": f"{method}_{rule.endpoint.replace('.', '_')}",
            "summary": meta["summary"],
            "tags": [rule.endpoint.split(".")[0]],
            "parameters": _path_params(rule.rule),
            "responses": {},
            "x-retort-role": meta["role"],
        }
        if meta["description"]:
            op["description"] = meta["description"]
        if meta["query"]:
            op["parameters"] += _query_params(components[meta["query"].__name__], components)
        if meta["body"]:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(meta["body"], "validation")]}},
            }
        elif meta["raw_body"]:
            op["requestBody"] = {
                "required": True,
                "content": {meta["raw_body"]: {"schema": {"type": "string", "format": "binary"}}},
            }
        for status, model in meta["responses"].items():
            op["responses"][str(status)] = _response(model, refs)
        error = {
            "description": "refused: see `error.code`",
            "content": {"application/json": {"schema": refs[(ErrorDocument, "serialization")]}},
        }
        op["responses"]["4XX"] = error
        op["responses"]["503"] = {**error, "description": "busy or a dependency is down"}
        paths.setdefault(path, {})[method] = op

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Retort",
            "version": version,
            "description": "Migration-as-a-service for Alembic. Every route needs "
            "`Authorization: Bearer <token>`; `x-retort-role` names the least role "
            "(viewer < deployer < admin) an operation needs.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _response(model: type[BaseModel] | str | None, refs: dict) -> dict[str, Any]:
    if model is None:
        return {"description": "no content"}
    if model == "text/event-stream":
        # Before OpenAPI 3.2, `schema` describes each event of a stream.
        event = {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"enum": ["state", "step", "end"]},
                "data": {"type": "string", "contentMediaType": "application/json"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        }
        return {"description": "Server-Sent Events", "content": {model: {"schema": event}}}
    if isinstance(model, str):
        return {"description": model, "content": {model: {"schema": {"type": "string"}}}}
    return {
        "description": (model.__doc__ or model.__name__).strip().splitlines()[0],
        "content": {"application/json": {"schema": refs[(model, "serialization")]}},
    }


def _path_params(rule: str) -> list[dict[str, Any]]:
    params = []
    for match in _ARG.finditer(rule):
        if match.group("conv") == "id":
            schema = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
        else:
            schema = {"type": "string", "minLength": 1}
        params.append(
            {"name": match.group("name"), "in": "path", "required": True, "schema": schema}
        )
    return params


def _query_params(schema: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


# The /docs page: a self-contained renderer of the document (no CDN: works air-gapped).
DOCS_PAGE = (Path(__file__).parent / "docs.html").read_text()
