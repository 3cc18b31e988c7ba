"""The OpenAPI document as clients and the schema fuzzer read it: every status a route can answer, declared.

FastAPI documents a 422 for each route with parameters; under /v2 the server answers such requests with the
protocol's 400 {"error": ...} instead (main.py), so the document says so there.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

V2_MALFORMED = {"description": "malformed request: a parameter or body outside its declared constraints",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}}


def document(app: FastAPI) -> dict:
    """The app's OpenAPI document, built once."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, item in schema["paths"].items():
            if path == "/v2" or path.startswith("/v2/"):
                for operation in item.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", V2_MALFORMED)
        app.openapi_schema = schema
    return app.openapi_schema
