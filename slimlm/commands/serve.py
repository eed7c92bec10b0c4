"""`slimlm serve`: the OpenAI-compatible HTTP API and the web chat page over one engine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slimlm.commands.cluster_args import add_cluster_args, wants_cluster
from slimlm.commands.common import add_engine_args, add_model_args, llm_from_args
from slimlm.errors import SlimlmError
from slimlm.formats.sizes import parse_size
from slimlm.guard.serve_args import add_guard_arguments

API_KEY_ENV = "SLIMLM_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health and the chat page (default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: smollm2-135m, or the model's file/directory name)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=64,
        help="generation requests in flight before answering 429 (default 64)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=2 * 2**20,
        help="largest request body accepted, e.g. 2MiB (default); larger gets 413",
    )
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level")
    add_cluster_args(p)
    add_model_args(p)
    add_engine_args(p)
    add_guard_arguments(p)


def served_model_name(model: str | None) -> str:
    """smollm2-135m for the embedded default, else the file (without .gguf) or directory name."""
    from slimlm.loading.default_model import ALIASES, DEFAULT_ALIAS

    if model is None or model.lower() in ALIASES:
        return DEFAULT_ALIAS
    path = Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def run(args: argparse.Namespace) -> int:
    from slimlm.guard.serve_args import guard_from_args
    from slimlm.server import ServerSettings, create_app
    from slimlm.server.guard_route import install_guard
    from slimlm.server.launch import bind_socket, run_server

    if not 0 <= args.port <= 65535:
        raise SlimlmError(f"--port must be in [0, 65535], got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(
        model_name=args.served_model_name or served_model_name(args.model),
        api_key=api_key,
        max_concurrent_requests=args.max_concurrent_requests,
        max_body_bytes=args.max_body_bytes,
    )
    guard, embedder = guard_from_args(args)  # a bad library or fallbacks file fails before the model loads
    if wants_cluster(args):  # engine replicas on Ray Serve (slimlm/cluster)
        del guard, embedder  # checked; the ingress loads its own copy (slimlm/cluster/guard_spec.py)
        from slimlm.cluster.launch import run_cluster

        return run_cluster(args, settings)
    sock = bind_socket(args.host, args.port)  # fail on a taken port before loading the model
    try:
        llm = llm_from_args(args)
        print(llm.memory_report_text(), file=sys.stderr)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving {settings.model_name} at http://{shown}:{port}/v1  (chat page: http://{shown}:{port}/, "
            f"API docs: /docs){'' if api_key else '  no API key'}",
            file=sys.stderr,
        )
        if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: listening on {args.host} without an API key; anyone who can reach this port can use "
                f"the model (set --api-key or ${API_KEY_ENV})",
                file=sys.stderr,
            )
        try:
            app = create_app(llm, settings)
            install_guard(app, guard, embedder)
            run_server(app, sock, args.log_level)
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it already handled gracefully
            pass
    finally:
        sock.close()
    return 0
