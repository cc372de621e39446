"""OpenTelemetry across processes, for tests/test_otel.py: run as a script, prints JSON.

Main and its child each export spans to an in-memory exporter; main invokes
the child's ``work`` inside a span of its own, then asks the child for the
spans it finished, and prints both processes' spans.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tether
from tether.aio.loop import run

EXPORTER = InMemorySpanExporter()


def configure() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


def describe(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "kind": span.kind.name,
    }


async def child(peer: tether.Peer) -> None:
    """Configures its own exporter; ``work`` makes a span inside the handler's."""
    configure()
    done = asyncio.Event()

    def work(call: tether.Call, x: int) -> int:
        with trace.get_tracer("test").start_as_current_span("inner work"):
            return x + 1

    peer.handle("work", work)
    peer.handle("spans", lambda call: [describe(s) for s in EXPORTER.get_finished_spans()])
    peer.on("quit", lambda call: done.set())
    await asyncio.wait_for(done.wait(), 60)


async def amain() -> None:
    configure()
    async with tether.Main() as main:
        c = await main.spawn(child)
        with trace.get_tracer("test").start_as_current_span("request"):
            assert await c.invoke("work", 1, timeout=30) == 2
        child_spans = await c.invoke("spans", timeout=30)
        await c.send("quit")
        await c.wait(30)
    json.dump(
        {
            "main": [describe(s) for s in EXPORTER.get_finished_spans()],
            "child": child_spans,
            "child_pid": c.pid,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    run(amain())
