"""`slimlm serve` options for engine replicas on Ray Serve (slimlm/cluster; Ray is the `cluster` extra)."""

from __future__ import annotations

import argparse


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas on Ray Serve (pip install 'slimlm[cluster]'; see docs/cluster.md)")
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="run N engine replicas behind this endpoint (--threads each)",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join a running Ray cluster: auto (this machine's) or HOST:PORT (default: start a local Ray)",
    )
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")


def wants_cluster(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, k, None) is not None
        for k in ("replicas", "ray_address", "min_replicas", "max_replicas")
    )
