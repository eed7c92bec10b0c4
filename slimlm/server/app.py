"""The FastAPI application: routes, middleware, and the engine thread's lifetime."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from slimlm import __version__
from slimlm.errors import SlimlmError
from slimlm.server.async_engine import AsyncEngine
from slimlm.server.errors import APIError, install_error_handlers
from slimlm.server.generation import ConcurrencyLimit, Generation
from slimlm.server.metrics import Metrics
from slimlm.server.middleware import APIKeyCheck, BodySizeLimit, RequestCounter
from slimlm.server.openapi import install_openapi
from slimlm.server.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_BODY_BYTES = 2 * 2**20
# No API key on these: load balancers probe /health, and the chat page is static HTML that asks for the
# key itself (a browser cannot send an Authorization header when it opens a page). The API description
# (/docs, /openapi.json) holds no data, only what any copy of slimlm publishes, and clients and schema
# tools read it before they have a key; the favicon is the page's.
OPEN_PATHS = frozenset(
    {"/health", "/", "/ui", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


@dataclass
class ServerSettings:
    """What the HTTP layer enforces, independent of the model and the engine."""

    model_name: str = "smollm2-135m"
    api_key: str | None = None
    max_concurrent_requests: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if not self.model_name:
            raise SlimlmError("the served model name is empty; pass --served-model-name NAME")
        if self.max_concurrent_requests < 1:
            raise SlimlmError(
                f"--max-concurrent-requests must be at least 1, got {self.max_concurrent_requests}"
            )
        if self.max_body_bytes < 1024:
            raise SlimlmError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise SlimlmError("the API key is empty; pass a non-empty --api-key or leave it unset")


def _static(name: str) -> str:
    return (resources.files("slimlm.server") / "static" / name).read_text(encoding="utf-8")


def _chat_page() -> str:
    return _static("index.html")


def create_app(llm, settings: ServerSettings | None = None, engine: AsyncEngine | None = None) -> FastAPI:
    """An OpenAI-compatible app over `llm` (an `slimlm.engine.llm.LLM`); one engine thread serves all."""
    settings = settings or ServerSettings()
    engine = engine or AsyncEngine(llm)
    metrics = Metrics(settings.model_name)
    generation = Generation(
        llm,
        engine,
        metrics,
        ConcurrencyLimit(settings.max_concurrent_requests, metrics),
        [settings.model_name],
    )
    created = int(time.time())
    page = _chat_page()
    icon = _static("favicon.svg")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(
        title="slimlm",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible API over slimlm's paged, continuously batched engine.",
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    install_openapi(
        app, OPEN_PATHS, settings.api_key is not None, llm.engine.max_model_len, [settings.model_name]
    )

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "slimlm",
            "max_model_len": llm.engine.max_model_len,
        }

    @app.get("/health", tags=["server"])
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", tags=["models"])
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(
                404, f"The model `{model_id}` does not exist", param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions", tags=["generation"])
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await generation.chat(req, request)

    @app.post("/v1/completions", tags=["generation"])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await generation.completion(req, request)

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return PlainTextResponse(metrics.render(engine.snapshot), media_type="text/plain; version=0.0.4")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    # the last one added is the outermost: count everything, then check the key, then the body size
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyCheck, api_key=settings.api_key, open_paths=OPEN_PATHS)
    app.add_middleware(RequestCounter, metrics=metrics)
    return app
