"""The list of scenarios, their variants, and the targets from issue 3.

A scenario is one function ``fn(params) -> Result`` run in a fresh process by
:mod:`tether.bench.case`. ``peer`` names what a baseline stands for in the
ratio columns (``mp_pipe``, ``zmq``, ``grpc``, ``shm_reuse``, ``memcpy``); tether's rows
are compared with the baselines of the same group, size, direction and metric
(memcpy, which has no direction, with either).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .common import MiB

__all__ = [
    "BIG_SIZES",
    "BOTH",
    "DIRECTION_TITLES",
    "SCENARIOS",
    "TARGETS",
    "Run",
    "Scenario",
    "Target",
    "plan",
    "select",
]

BIG_SIZES = (64 * MiB, 256 * MiB)
QUICK_BIG_SIZES = (64 * MiB,)


#: Directions of a large transfer: main -> child and child -> main.
BOTH = ("m2c", "c2m")
DIRECTION_TITLES = {"m2c": "m->c", "c2m": "c->m"}


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str  # rt, ev, stream, inflight, big, kill, mem, pool
    func: str  # "module:function" inside tether.bench
    title: str
    peer: str | None = None  # for baselines: the ratio column it feeds
    tether: bool = False
    directions: tuple[str, ...] = ()  # big transfers: which ways it runs; () = no direction


def _s(
    name: str,
    group: str,
    title: str,
    peer: str | None = None,
    directions: tuple[str, ...] = (),
) -> Scenario:
    tether = peer is None
    if group == "big":
        module = "tether_bulk" if tether else "bulk"
    else:
        module = "tether_cases" if tether else "baselines"
    return Scenario(name, group, f"{module}:{name}", title, peer, tether, directions)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        _s("rt_socketpair", "rt", "socketpair (floor)", "socketpair"),
        _s("rt_mp_pipe", "rt", "mp.Pipe", "mp_pipe"),
        _s("rt_zmq", "rt", "pyzmq REQ/REP", "zmq"),
        _s("rt_tether_async", "rt", "tether async"),
        _s("rt_tether_sync", "rt", "tether blocking"),
        _s("rt_tether_sync_nospin", "rt", "tether blocking, spin=0"),
        _s("rt_tether_main_child", "rt", "tether main->child"),
        _s("rt_tether_spin", "rt", "tether main->child, spin"),
        _s("rt_tether_traced", "rt", "tether async, tracing on"),
        Scenario("rt_grpc", "rt", "grpc_cases:rt_grpc", "gRPC unary, blocking", "grpc"),
        # its own peer name: the 'vs gRPC' column compares with rt_grpc only
        Scenario("rt_grpc_aio", "rt", "grpc_cases:rt_grpc_aio", "gRPC unary, grpc.aio", "grpc_aio"),
        _s("ev_mp_pipe", "ev", "mp.Pipe", "mp_pipe"),
        _s("ev_zmq", "ev", "pyzmq PUSH/PULL", "zmq"),
        _s("ev_tether", "ev", "tether send/on"),
        _s("stream_zmq", "stream", "pyzmq PUSH/PULL", "zmq"),
        _s("stream_tether", "stream", "tether stream (async for)"),
        Scenario(
            "stream_grpc", "stream", "grpc_cases:stream_grpc", "gRPC server streaming", "grpc"
        ),
        Scenario("rt_nats_py", "rt", "nats_cases:rt_nats_py", "nats-py request/reply", "nats"),
        Scenario(
            "rt_nats_tether", "rt", "nats_cases:rt_nats_tether", "tether over NATS", tether=True
        ),
        Scenario("ev_nats_py", "ev", "nats_cases:ev_nats_py", "nats-py publish", "nats"),
        Scenario(
            "ev_nats_tether", "ev", "nats_cases:ev_nats_tether", "tether over NATS", tether=True
        ),
        _s("inflight_zmq", "inflight", "pyzmq DEALER/ROUTER", "zmq"),
        _s("inflight_tether", "inflight", "tether invoke"),
        _s("big_mp_pipe", "big", "mp.Pipe send_bytes", "mp_pipe", BOTH),
        _s("big_zmq", "big", "pyzmq copy=False", "zmq", BOTH),
        _s("big_shm", "big", "shared_memory (new segment)", "shm", BOTH),
        _s("big_shm_reuse", "big", "shared_memory (one segment reused)", "shm_reuse", BOTH),
        _s("big_memcpy", "big", "memcpy in-process (ceiling)", "memcpy"),
        _s("big_tether_attach", "big", "tether attachment", None, BOTH),
        _s("big_tether_buffer", "big", "tether Buffer", None, ("m2c",)),
        _s("kill_to_peergone", "kill", "SIGKILL -> PeerGone"),
        Scenario("mem_tether_idle", "mem", "connmem:mem_tether_idle", "tether Main", tether=True),
        Scenario(
            "mem_websockets_idle",
            "mem",
            "connmem:mem_websockets_idle",
            "websockets server (no compression)",
            "websockets",
        ),
        Scenario("mem_tether_flood", "mem", "connmem:mem_tether_flood", "tether Main", tether=True),
        Scenario(
            "cpu_slow_handler",
            "cpu",
            "cpu_cases:cpu_slow_handler",
            "tether caller of a 10 ms handler",
            tether=True,
        ),
        Scenario(
            "cpu_slow_handler_sync",
            "cpu",
            "cpu_cases:cpu_slow_handler_sync",
            "tether blocking caller of a 10 ms handler",
            tether=True,
        ),
        Scenario(
            "cpu_idle", "cpu", "cpu_cases:cpu_idle", "tether, 10 idle connections", tether=True
        ),
        Scenario("pool_ppe", "pool", "pools:pool_ppe", "ProcessPoolExecutor", "ppe"),
        Scenario("pool_loky", "pool", "pools:pool_loky", "loky reusable executor", "loky"),
        Scenario("pool_mp", "pool", "pools:pool_mp", "multiprocessing.Pool", "mp_pool"),
        Scenario("pool_tether", "pool", "pools:pool_tether", "tether.Pool", tether=True),
        Scenario(
            "pool_tether_sync", "pool", "pools:pool_tether_sync", "tether.sync.Pool", tether=True
        ),
    ]
}


@dataclass(frozen=True)
class Run:
    """One scenario with one set of parameters (a big transfer has one run per size)."""

    scenario: Scenario
    variant: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.scenario.name} {self.variant}" if self.variant else self.scenario.name


@dataclass(frozen=True)
class Target:
    """A goal from the issue: a ratio against a peer, or an absolute bound on the median.

    ``peer`` is ``None`` for an absolute bound (in the metric's unit);
    ``direction``, when set, limits it to the runs of that direction
    (``"m2c"`` or ``"c2m"``, see :data:`DIRECTION_TITLES`).
    """

    scenario: str
    metric: str
    op: str  # "<=", ">=", "<"
    bound: float
    peer: str | None = None
    direction: str | None = None

    def applies(self, run: Run, metric: str) -> bool:
        """Whether this target is about ``metric`` of ``run``."""
        return (
            self.scenario == run.scenario.name
            and self.metric == metric
            and (self.direction is None or self.direction == run.params.get("direction"))
        )

    def text(self) -> str:
        if self.peer is None:
            return f"{self.op}{self.bound:g}"
        short = {"mp_pipe": "pipe", "zmq": "zmq", "memcpy": "memcpy", "shm_reuse": "shm"}[self.peer]
        return f"{self.op}{self.bound:g}x {short}"

    def met(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.bound
        if self.op == ">=":
            return value >= self.bound
        return value < self.bound


_RT = "round trip"
TARGETS: list[Target] = [
    *(
        t
        for name in ("rt_tether_async", "rt_tether_sync", "rt_tether_main_child")
        for t in (Target(name, _RT, "<=", 1.0, "mp_pipe"), Target(name, _RT, "<=", 0.5, "zmq"))
    ),
    Target("rt_tether_sync", _RT, "<=", 0.5, "mp_pipe"),  # the blocking API keeps its lead
    Target("rt_tether_spin", _RT, "<=", 0.25, "mp_pipe"),  # the stretch goal
    Target("ev_tether", "events", ">=", 1.0, "zmq"),
    Target("ev_tether", "events", ">=", 3.0, "mp_pipe"),
    Target("big_tether_attach", "transfer", ">=", 0.6, "memcpy", "m2c"),
    Target("big_tether_attach", "transfer", ">=", 8.0, "mp_pipe", "m2c"),
    # child -> main: main copies out what a child lends (it never reads what
    # the child could still change), so two copies at memory speed
    Target("big_tether_attach", "transfer", ">=", 0.3, "memcpy", "c2m"),
    Target("big_tether_buffer", "handoff", "<", 1.0),
    Target("kill_to_peergone", "SIGKILL->PeerGone", "<", 10.0),
    Target("mem_tether_idle", "idle connection", "<=", 16.0),  # KiB
    Target("mem_tether_flood", "RSS growth", "<", 100.0),  # MiB
    Target("mem_tether_flood", "peak RSS growth", "<", 100.0),
    Target("cpu_slow_handler", "caller CPU", "<", 5.0),  # % of one core
    Target("cpu_slow_handler_sync", "caller CPU", "<", 5.0),
    Target("cpu_idle", "idle CPU over floor", "<", 1.0),  # % of one core, both processes
]


def select(only: str | None) -> list[Scenario]:
    """Scenarios named in ``only`` (comma-separated names or glob patterns), in table order.

    Raises:
        ValueError: a name matches no scenario.
    """
    if not only:
        return list(SCENARIOS.values())
    wanted: set[str] = set()
    for pat in (p.strip() for p in only.split(",")):
        if not pat:
            continue
        hits = fnmatch.filter(SCENARIOS, pat)
        if not hits:
            raise ValueError(f"no scenario matches {pat!r}; known: {', '.join(SCENARIOS)}")
        wanted.update(hits)
    return [s for s in SCENARIOS.values() if s.name in wanted]


def plan(scenarios: list[Scenario], quick: bool, cpus: list[int] | None = None) -> list[Run]:
    """Expand scenarios into runs (one per transfer size and direction for the ``big`` group).

    ``cpus``: pin each case process (and so its children) to these CPUs.
    """
    runs: list[Run] = []
    sizes = QUICK_BIG_SIZES if quick else BIG_SIZES
    base: dict[str, Any] = {"quick": quick}
    if cpus:
        base["cpus"] = list(cpus)
    for s in scenarios:
        if s.group == "big":
            for size in sizes:
                if not s.directions:
                    runs.append(Run(s, f"{size // MiB}MiB", {**base, "size": size}))
                for d in s.directions:
                    variant = f"{size // MiB}MiB {DIRECTION_TITLES[d]}"
                    runs.append(Run(s, variant, {**base, "size": size, "direction": d}))
        else:
            runs.append(Run(s, "", dict(base)))
    return runs
