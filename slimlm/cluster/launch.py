"""Start (or join) Ray, deploy the ingress and the engine replicas on Ray Serve, and stop them again.

    slimlm serve --replicas 2 --threads 1                 # a local Ray instance on this machine
    slimlm serve --replicas 2 --ray-address auto          # the Ray cluster this machine belongs to
    slimlm serve --min-replicas 1 --max-replicas 4 ...    # Ray Serve autoscaling between the bounds

Every user mistake is a one-line SlimlmError before anything starts: Ray missing, a bad replica count,
an unreachable address (a TCP check and a bounded `ray.init`, never a hang), a taken port.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from slimlm.cluster import require_ray
from slimlm.errors import SlimlmError

APP_NAME = "slimlm"
ROUTER = "slimlm.cluster.router.PrefixAffinityRouter"
CONNECT_TIMEOUT_S = 30.0
log = logging.getLogger("slimlm.cluster")


@dataclass
class ReplicaPlan:
    replicas: int
    min_replicas: int | None
    max_replicas: int | None
    threads: int

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


def replica_plan(args: argparse.Namespace) -> ReplicaPlan:
    """Validate --replicas / --min-replicas / --max-replicas / --threads (before Ray is touched)."""
    lo, hi = args.min_replicas, args.max_replicas
    n = args.replicas if args.replicas is not None else (lo if lo is not None else 1)
    if n < 1:
        raise SlimlmError(f"--replicas must be at least 1, got {n}; omit it to serve without Ray")
    if lo is not None and lo < 0 or hi is not None and hi < 1:
        raise SlimlmError(f"--min-replicas must be >= 0 and --max-replicas >= 1, got {lo} and {hi}")
    if lo is not None or hi is not None:
        lo = n if lo is None else lo
        hi = max(n, lo) if hi is None else hi
        if not lo <= n <= hi:
            raise SlimlmError(f"need --min-replicas <= --replicas <= --max-replicas, got {lo} <= {n} <= {hi}")
    threads = args.threads if args.threads is not None else 1
    if threads < 1:
        raise SlimlmError(f"--threads must be positive, got {threads}")
    return ReplicaPlan(n, lo, hi, threads)


def connect(address: str | None, num_cpus: int | None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Join the Ray cluster at `address` ("auto" or HOST:PORT) or start a small local one (returns True
    when it started one). Bounded: an address nobody answers on is an error within `timeout` seconds."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"namespace": APP_NAME, "logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        # On this thread: Ray's daemons die with the thread that started them (PR_SET_PDEATHSIG).
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        try:
            ray.init(**kwargs)
        except Exception as e:
            raise SlimlmError(f"cannot start a local Ray instance: {_first_line(e)}") from None
        return True
    kwargs["address"] = address
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported on the caller's thread
            failure.append(e)

    worker = threading.Thread(target=init, name="slimlm-ray-init", daemon=True)
    worker.start()
    worker.join(timeout)
    where = f"Ray at {address}"
    if worker.is_alive():
        raise SlimlmError(
            f"{where} did not answer within {timeout:.0f} s; check the address and that Ray runs there"
        )
    if failure:
        first_line = _first_line(failure[0])
        hint = "; start one with `ray start --head` or drop --ray-address" if address == "auto" else ""
        raise SlimlmError(f"cannot connect to {where}: {first_line}{hint}")
    return False


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SlimlmError(f"--ray-address must be 'auto' or HOST:PORT (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SlimlmError(
            f"cannot reach Ray at {address} ({e.strerror or type(e).__name__}); run `ray start --head` there "
            "or check the address and firewall"
        ) from None


def engine_args(args: argparse.Namespace) -> dict:
    """The serve arguments a replica needs to build its LLM (plain values; model paths made absolute)."""
    plain = (str, int, float, bool, type(None), list, tuple)
    out = {k: v for k, v in vars(args).items() if isinstance(v, plain)}
    if args.model and Path(args.model).expanduser().exists():
        out["model"] = str(Path(args.model).expanduser().resolve())
    return out


def build_application(args: argparse.Namespace, settings, plan: ReplicaPlan):
    """The Ray Serve application: Frontend (ingress, 0 CPUs) -> EngineReplica x N (plan.threads CPUs each)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from slimlm.cluster.frontend import ingress_class
    from slimlm.cluster.guard_spec import GuardSpec
    from slimlm.cluster.prompt_side import load_prompt_side
    from slimlm.cluster.replica import EngineReplica
    from slimlm.commands.common import engine_config_from_args

    block_size = engine_config_from_args(args).block_size  # validates the engine settings here, once
    prompt_side = load_prompt_side(engine_args(args).get("model"), args.max_model_len)
    replica_options: dict = {
        "name": "EngineReplica",
        "ray_actor_options": {"num_cpus": plan.threads,
                              "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(plan.threads)}}},
        "max_ongoing_requests": max(1, args.max_concurrent_requests),
        "health_check_period_s": 5,
        # By import path: a pickled class would carry its own copy of the module (and its affinity table).
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER),
    }  # fmt: skip
    if plan.autoscaling:
        replica_options["autoscaling_config"] = {
            "min_replicas": plan.min_replicas,
            "initial_replicas": plan.replicas,
            "max_replicas": plan.max_replicas,
            "target_ongoing_requests": max(1, args.max_num_seqs // 2),
        }
    else:
        replica_options["num_replicas"] = plan.replicas
    engines = serve.deployment(EngineReplica, **replica_options).bind(engine_args(args), plan.threads)
    guard_spec = GuardSpec.from_args(args)
    frontend_actor: dict = {"num_cpus": 0}
    if guard_spec is not None:  # the guard embeds answers in the ingress: as many threads as a replica
        frontend_actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(plan.threads)}}
    frontend = serve.deployment(
        ingress_class(),
        name="Frontend",
        num_replicas=1,  # one ingress: the guard's counters for /metrics live in one place
        ray_actor_options=frontend_actor,
        max_ongoing_requests=args.max_concurrent_requests + 64,  # slimlm's own limit answers 429 first
    )
    return frontend.bind(engines, prompt_side, settings, block_size, guard_spec)


class ClusterServer:
    """Ray Serve replicas behind one endpoint, for the CLI, tests and benchmarks (`with` stops them).

    `num_cpus`: the CPUs of a local Ray instance (default: replicas x threads)."""

    def __init__(self, args: argparse.Namespace, settings, num_cpus: int | None = None) -> None:
        require_ray()
        self.args, self.settings = args, settings
        self.plan = replica_plan(args)
        if not 0 <= args.port <= 65535:
            raise SlimlmError(f"--port must be in [0, 65535], got {args.port}")
        self.host = args.host
        self.port = _free_port(args.host, args.port)
        self.num_cpus = num_cpus or self.plan.replicas * self.plan.threads
        self.started_ray = False
        if args.ray_address not in (None, "auto"):
            _check_reachable(args.ray_address)  # before the model is read: a wrong address fails in seconds

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def start(self) -> ClusterServer:
        from ray import serve

        app = build_application(self.args, self.settings, self.plan)  # model/engine mistakes: before Ray
        self.started_ray = connect(self.args.ray_address, self.num_cpus)
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            serve.run(app, name=APP_NAME, route_prefix="/")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self.started_ray:
                serve.shutdown()
            else:  # someone else's cluster: remove only our application
                serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                ray.shutdown()

    def __enter__(self) -> ClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str, port: int) -> int:
    """The port itself if it is free (a clear error if taken), or a free one for port 0."""
    from slimlm.server.launch import bind_socket

    sock = bind_socket(host, port)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def run_cluster(args: argparse.Namespace, settings) -> int:
    """`slimlm serve --replicas N`: serve until Ctrl-C."""
    import sys
    import time

    server = ClusterServer(args, settings)
    plan = server.plan
    scale = (f"{plan.min_replicas}..{plan.max_replicas} replicas (autoscaling, {plan.replicas} to start)"
             if plan.autoscaling else f"{plan.replicas} replica(s)")  # fmt: skip
    where = "a local Ray instance" if args.ray_address is None else f"Ray at {args.ray_address}"
    print(f"starting {scale} x {plan.threads} thread(s) on {where}...", file=sys.stderr)
    server.start()
    try:
        print(f"serving {settings.model_name} at {server.url}/v1 (chat page: {server.url}/)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
