"""The ingress deployment: slimlm's FastAPI app (`slimlm.server.create_app`) over a `RemoteEngine`.

Everything HTTP (routes, API key, body and concurrency limits, /metrics, the chat page, error bodies) is
the same code as `slimlm serve`; only the engine behind it is remote. Every generation response carries
an `x-slimlm-replica` header naming the replica that served it (also logged).
"""

from __future__ import annotations

from slimlm.cluster.remote_engine import RemoteEngine, served_by

REPLICA_HEADER = "x-slimlm-replica"


class ReplicaHeader:
    """ASGI middleware: gives the request a holder that RemoteEngine.submit fills, and sends it as a header.

    The handler submits to the engine before it starts the response, so the header is known in time, for
    streamed answers too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict = {}
        token = served_by.set(holder)

        async def send_with_replica(message) -> None:
            if message["type"] == "http.response.start" and "replica" in holder:
                headers = list(message.get("headers", []))
                headers.append((REPLICA_HEADER.encode(), holder["replica"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            served_by.reset(token)


class Frontend:
    """Wrapped by `ingress_class()`; kept undecorated here so Ray pickles it by reference (a decorated
    module attribute would make cloudpickle copy the class and the modules it uses, and the router would
    then read another affinity table than the one this ingress fills)."""

    def __init__(self, engines, prompt_side, settings, block_size: int, guard_spec=None) -> None:
        self.engines = engines
        self.prompt_side = prompt_side
        self.settings = settings
        self.block_size = block_size
        self.guard_spec = guard_spec  # slimlm.cluster.guard_spec.GuardSpec: --guard / --embeddings

    def __serve_build_asgi_app__(self):
        from slimlm.server import create_app

        self.remote = RemoteEngine(self.engines, self.block_size)
        app = create_app(self.prompt_side, self.settings, engine=self.remote)
        if self.guard_spec is not None:  # the same middleware and route as one `slimlm serve`
            from slimlm.server.guard_route import install_guard

            install_guard(app, *self.guard_spec.load())
        app.add_middleware(ReplicaHeader)
        return app


def ingress_class():
    """Frontend as a Ray Serve FastAPI ingress (the app is built on the replica)."""
    from ray import serve

    return serve.ingress()(Frontend)
