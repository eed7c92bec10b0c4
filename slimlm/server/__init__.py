"""OpenAI-compatible HTTP server over the engine, with a web chat page.

    from slimlm.engine.llm import LLM
    from slimlm.server import ServerSettings, ServerThread, create_app

    app = create_app(LLM(), ServerSettings(api_key="secret"))

The app only translates between HTTP and the engine; one background thread (`AsyncEngine`) owns the
engine so requests from every client are batched together. FastAPI and uvicorn are the `serve` extra.
"""

from slimlm.server.app import ServerSettings, create_app
from slimlm.server.async_engine import AsyncEngine
from slimlm.server.launch import ServerThread

__all__ = ["AsyncEngine", "ServerSettings", "ServerThread", "create_app"]
