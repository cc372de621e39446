"""OpenTelemetry spans for invokes, with W3C trace context carried in the INVOKE frame.

A peer announces the ``trace`` feature in its HELLO (docs/protocol.md 7.7)
when its process has loaded the OpenTelemetry API (``opentelemetry.trace``)
by the time the connection is made: configure the tracer before connecting
or spawning (a child's target module configures its own at import). A
process that never imports OpenTelemetry imports nothing here, pays one
dictionary lookup per connection, and its frames are byte for byte those of
a peer without this module.

On a connection where both sides announced ``trace``, an invoke made while
a tracer is configured (a recording span can be started) becomes a
``CLIENT`` span ``invoke <channel>`` on the caller; its ``traceparent``
travels after the channel name, and the callee runs the handler inside a
``SERVER`` span ``handle <channel>`` whose parent is the caller's span, in
the same trace, whichever process or host it runs in.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ["available", "client_span", "traced_handler"]

_TRACER = "tether"


def available() -> bool:
    """Whether this process loaded the OpenTelemetry API (which configuring a tracer does).

    Asked when a connection is made: a peer then announces ``trace``. Nothing
    is imported to answer, so a process that never touched OpenTelemetry
    pays nothing and its HELLO is unchanged.
    """
    return "opentelemetry.trace" in sys.modules


def client_span(channel: bytes, fut: asyncio.Future[Any]) -> bytes:
    """Start the caller's span of an invoke of ``channel``; return the channel to send.

    The span ends when ``fut`` (the invoke's answer) is done, with an error
    status if it failed. With no tracer configured (no recording span) the
    channel is returned unchanged.
    """
    if "opentelemetry.trace" not in sys.modules:  # no one configured a tracer: no import
        return channel
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    name = channel.decode("utf-8", "replace")
    tracer = trace.get_tracer(_TRACER)
    span = tracer.start_span(
        f"invoke {name}",
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "tether", "rpc.method": name},
    )
    if not span.is_recording():
        span.end()
        return channel
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    parent = carrier.get("traceparent")
    if parent is None:
        span.end()
        return channel

    def done(f: asyncio.Future[Any]) -> None:
        if f.cancelled():
            span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled"))
        elif (exc := f.exception()) is not None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        span.end()

    fut.add_done_callback(done)
    extra = "\0" + parent
    if state := carrier.get("tracestate"):
        extra += "\0" + state
    return channel + extra.encode("ascii", "replace")


class _Traced:
    """A handler run inside a ``SERVER`` span whose parent came in the INVOKE."""

    def __init__(self, handler: Any, channel: str, traceparent: str) -> None:
        self._handler = handler
        self._channel = channel
        self._carrier = {"traceparent": traceparent}
        self.is_async = handler.is_async

    def _start(self) -> tuple[Any, Any]:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(self._carrier)
        span = trace.get_tracer(_TRACER).start_span(
            f"handle {self._channel}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "tether", "rpc.method": self._channel},
        )
        token = context.attach(trace.set_span_in_context(span))
        return span, token

    @staticmethod
    def _end(span: Any, token: Any, exc: BaseException | None) -> None:
        from opentelemetry import context, trace

        if exc is not None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        span.end()
        context.detach(token)

    def fn(self, call: Any, *args: Any) -> Any:
        span, token = self._start()
        try:
            result = self._handler.fn(call, *args)
        except BaseException as exc:
            self._end(span, token, exc)
            raise
        self._end(span, token, None)
        return result

    async def run(self, call: Any, *args: Any) -> Any:
        span, token = self._start()
        try:
            result = await self._handler.run(call, *args)
        except BaseException as exc:
            self._end(span, token, exc)
            raise
        self._end(span, token, None)
        return result


def traced_handler(handler: Any, channel: str, traceparent: str) -> Any:
    """``handler``, run inside a span that continues the caller's trace.

    Unchanged when this process has not loaded OpenTelemetry (no tracer is configured).
    """
    if "opentelemetry.trace" not in sys.modules:
        return handler
    return _Traced(handler, channel, traceparent)
