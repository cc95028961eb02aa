"""Malformed requests get INVALID_ARGUMENT, not a server-side traceback.

gRPC normally parses a request before the handler runs and reports bytes it
cannot parse as UNKNOWN with an error logged per call: anyone able to reach
the port could flood the log that way. This interceptor hands the handler the
raw bytes, parses them itself, and refuses what does not parse with one
INVALID_ARGUMENT line.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger("dtrain.control")


def _parser(deserializer, method: str):
    def parse(raw):
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's fault
            raise _Malformed(f"malformed request to {method}: {type(e).__name__}") from None

    return parse


class _Malformed(Exception):
    pass


async def _drain(result, context) -> None:
    """Run a streaming handler written either as an async generator or with context.write."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            await context.write(item)
    else:
        await result


class ParseGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._wrapped = {}  # (method, handler id) -> guarded handler, built once

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        key = (details.method, id(handler))
        guarded = self._wrapped.get(key)
        if guarded is None:
            guarded = self._wrapped[key] = _guard(handler, details.method)
        return guarded


def _guard(handler, method: str):
    """The same kind of handler, parsing the raw request itself."""
    parse = _parser(handler.request_deserializer, method)
    ser = handler.response_serializer
    if not handler.request_streaming and not handler.response_streaming:
        inner = handler.unary_unary

        async def unary_unary(raw, context):
            try:
                request = parse(raw)
            except _Malformed as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, ser)
    if not handler.request_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(raw, context):
            try:
                request = parse(raw)
            except _Malformed as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            await _drain(inner_us(request, context), context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, ser)

    async def parsed(raw_iter, context):
        async for raw in raw_iter:
            try:
                yield parse(raw)
            except _Malformed as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    if handler.response_streaming:
        inner_ss = handler.stream_stream

        async def stream_stream(raw_iter, context):
            await _drain(inner_ss(parsed(raw_iter, context), context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, ser)
    inner_su = handler.stream_unary

    async def stream_unary(raw_iter, context):
        return await inner_su(parsed(raw_iter, context), context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, None, ser)
