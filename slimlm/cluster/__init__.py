"""Serving replicas on Ray Serve: `slimlm serve --replicas N [--ray-address auto|HOST:PORT]`.

One ingress replica runs slimlm's own FastAPI app (routes, API key, limits, metrics, web page); its engine
is `RemoteEngine`, which sends each request's token ids to one of N `EngineReplica` deployments (each a
whole slimlm engine) through a Ray Serve handle whose request router keeps a conversation on the replica
that already holds its prompt prefix in the KV cache. Ray is optional: `pip install 'slimlm[cluster]'`.
"""

INSTALL_HINT = (
    "--replicas needs Ray Serve, which is not installed; pip install 'slimlm[cluster]' (or 'ray[serve]')"
)


def require_ray() -> None:
    """Raise a SlimlmError with the install hint when Ray Serve cannot be imported."""
    from slimlm.errors import SlimlmError

    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise SlimlmError(INSTALL_HINT) from None
