"""The one place where domain errors become gRPC status codes.

Servicer methods raise plain domain exceptions; `grpc_errors` (unary) and
`grpc_stream_errors` (server streaming) turn them into a status with the exception's message.
Anything unexpected is INTERNAL with a generic message: the traceback goes to the log, never
to the caller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

log = logging.getLogger("secant.errors")


class LimitExceeded(Exception):
    """A request is larger than this server allows (dimension, expression, jobs in flight)."""


class Unauthenticated(Exception):
    """No valid credentials came with the call (no token, or one this server does not know)."""


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job_id: no job {job_id!r}")
        self.job_id = job_id


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps a domain exception to (status code, message for the caller)."""
    # Order matters: ObjectiveError is a ValueError; UntrustedCodeError a PermissionError.
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc) or "unauthenticated"
    if isinstance(exc, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, JobNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, PermissionError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc) or "permission denied"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid argument"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the caller did not answer in time"
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(code, message)


def grpc_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


def grpc_stream_errors(method: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method.__name__)

    return wrapper


class MalformedRequest(ValueError):
    """The request bytes are not a valid message of the method's request type."""


class RequestParsingInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests itself so that bytes which are not the method's message are
    INVALID_ARGUMENT (grpc.aio's own deserializing answers UNKNOWN and logs a traceback).

    Unary requests reach the handler as raw bytes and are parsed in the handler's task; for
    streamed requests the deserializer raises MalformedRequest, which the servicer's error
    mapping turns into INVALID_ARGUMENT like any other ValueError."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def parse(raw: bytes):
            try:
                return deserialize(raw)
            except Exception as exc:
                raise MalformedRequest(
                    f"the request is not a valid {method} request message ({exc})"
                ) from None

        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(raw, context):
                try:
                    request = parse(raw)
                except MalformedRequest as exc:
                    await context.abort(*status_for(exc))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, response_serializer=serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(raw, context):
                try:
                    request = parse(raw)
                except MalformedRequest as exc:
                    await context.abort(*status_for(exc))
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, response_serializer=serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream, request_deserializer=parse,
                response_serializer=serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary, request_deserializer=parse, response_serializer=serializer
        )
