"""The one exception type the SDK raises for anything the service (or the wire) refused."""

from __future__ import annotations

import grpc


class SecantError(Exception):
    """A call to secant failed: ``code`` is the gRPC status, ``message`` the server's words.

    Modelled on Temporal's ``RPCError``: callers branch on ``err.code``
    (``grpc.StatusCode.INVALID_ARGUMENT``, ``NOT_FOUND``, ``DEADLINE_EXCEEDED``, ...) and show
    ``err.message`` to a person. A job that failed on the worker raises this too, with the
    code the job's failure event named.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"SecantError({self.message!r}, code=grpc.StatusCode.{self.code.name})"

    def __reduce__(self):  # picklable across processes (Ray, multiprocessing)
        return (_rebuild, (self.message, self.code.name))


def _rebuild(message: str, code_name: str) -> SecantError:
    return SecantError(message, grpc.StatusCode[code_name])


def status_code_from_name(name: str) -> grpc.StatusCode:
    """Maps a status code name from a Failure event ("INVALID_ARGUMENT") to the enum."""
    try:
        return grpc.StatusCode[name.strip().upper()] if name else grpc.StatusCode.UNKNOWN
    except KeyError:
        return grpc.StatusCode.UNKNOWN


def from_rpc_error(error: grpc.RpcError) -> SecantError:
    """Turns a grpc (or grpc.aio) RpcError into a SecantError, keeping code and details."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return SecantError(details or str(error) or code.name, code)
