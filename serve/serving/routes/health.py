"""GET /health (no API key needed) and the API docs: FastAPI's /docs and /openapi.json, with the
streamed chat events added to the schema's components (no route names them as a body)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from serve.serving import api
from serve.serving.engine import Engine, engine

router = APIRouter()


@router.get("/health", response_model=api.Health)
async def health(engine: Engine = Depends(engine)):
    return api.Health(status="ok", model=engine.name)


def add_schemas(app: FastAPI, models=(api.ChatCompletionChunk,)) -> None:
    """Put models that no FastAPI body or response_model names into the OpenAPI components."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
        return app.openapi_schema

    app.openapi = openapi
