"""Who is calling: bearer tokens from a file (hashed at rest), roles, and the interceptor that
checks them on every RPC.

The tokens file (`secant serve --tokens FILE`) holds one entry per line, each a YAML/JSON flow
mapping, so that `secant tokens add` can append and a person can read and edit it::

    - {caller: alice, roles: [solve, train], sha256: 9f86d0...}
    - {caller: ops, roles: [admin], sha256: 2c26b4...}

A plain YAML list of the same mappings, or JSON lines, also load. Only the SHA-256 of each
token is stored: tokens are 256 random bits, so a fast hash is as good as a slow one (there is
nothing to brute-force), and a leaked file lets no one in. The file is re-read when it changes
(checked at most once a second), so tokens rotate without a restart: add the new one, move
callers over, delete the old line.

Roles: `solve` (Solve, Submit, SubmitBatch, SolveWithCallbacks), `train` (Train, Plan),
`trust-code` (torch.export and cloudpickle objectives, on a server started with --trust-code;
checked in validation, which knows the objective's kind) and `admin` (sees, watches, lists and
cancels every caller's jobs; it grants nothing else). Reading and cancelling one's own jobs
needs no role. Health and reflection stay open.

`AuthInterceptor` answers UNAUTHENTICATED (no or unknown token) or PERMISSION_DENIED (missing
role) before the request body is even parsed, and otherwise runs the handler with the caller
in a contextvar (`current_caller()`), from which the servicer takes the job's owner.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from service.errors import Unauthenticated, status_for

ROLES = frozenset({"solve", "train", "trust-code", "admin"})
OPTIMIZER_SERVICE = "secant.v1.Optimizer"
# What each Optimizer RPC needs beyond a valid token. Job-scoped reads and cancel need none:
# ownership decides what a caller sees there. An RPC missing here needs `admin` (fail closed).
METHOD_ROLES: dict[str, str | None] = {
    "Solve": "solve",
    "Submit": "solve",
    "SubmitBatch": "solve",
    "SolveWithCallbacks": "solve",
    "Train": "train",
    "Plan": "train",
    "Watch": None,
    "GetJob": None,
    "ListJobs": None,
    "CancelJob": None,
    "GetArtifact": None,
}
# Services anyone may call: load balancers and grpcurl must work without a token.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
_CALLER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
_TOKEN_PREFIX = "secant_"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its name (the owner of its jobs) and its roles."""

    name: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def can_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.name


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "secant_caller", default=None
)


def current_caller() -> Caller | None:
    """The caller of the RPC being handled; None when the server runs without auth."""
    return _current.get()


def visible(caller: Caller | None, owner: str) -> bool:
    """Whether `caller` may see a job owned by `owner` (everyone may, without auth)."""
    return caller is None or caller.can_see(owner)


# -- tokens ------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe, with a greppable prefix."""
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    caller: str
    roles: frozenset[str]
    sha256: str


def _check_entry(raw: object, where: str) -> TokenEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping {{caller, roles, sha256}}, got {raw!r}")
    unknown = set(raw) - {"caller", "roles", "sha256"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    caller = raw.get("caller")
    if not isinstance(caller, str) or not _CALLER_NAME.match(caller):
        raise ValueError(f"{where}.caller: 1-128 of [A-Za-z0-9_.@-], got {caller!r}")
    roles = raw.get("roles", [])
    if isinstance(roles, str):
        roles = [r for r in roles.split(",") if r.strip()]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ValueError(f"{where}.roles: a list of role names, got {roles!r}")
    roles = frozenset(r.strip() for r in roles)
    if roles - ROLES:
        raise ValueError(f"{where}.roles: unknown {sorted(roles - ROLES)}; known {sorted(ROLES)}")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{where}.sha256: 64 lowercase hex digits (the token's SHA-256)")
    return TokenEntry(caller, roles, digest)


def parse_tokens(text: str, source: str = "tokens") -> list[TokenEntry]:
    """Entries of a tokens file: a YAML list of mappings, or JSON/YAML mappings one a line."""
    try:
        loaded = yaml.safe_load(text)
        raws = [] if loaded is None else loaded
        if isinstance(raws, dict) and "tokens" in raws:
            raws = raws["tokens"]
        if not isinstance(raws, list):
            raise ValueError
    except (yaml.YAMLError, ValueError):
        raws = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                raws.append(json.loads(line.removeprefix("- ")))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{number}: not a JSON/YAML mapping ({exc})") from None
    entries = [_check_entry(raw, f"{source}[{i}]") for i, raw in enumerate(raws)]
    seen: set[str] = set()
    for entry in entries:
        if entry.sha256 in seen:
            raise ValueError(f"{source}: the same token appears twice (caller {entry.caller})")
        seen.add(entry.sha256)
    return entries


def format_entry(entry: TokenEntry) -> str:
    """One line of a tokens file (YAML flow mapping, also valid JSON after '- ')."""
    record = {"caller": entry.caller, "roles": sorted(entry.roles), "sha256": entry.sha256}
    return "- " + json.dumps(record) + "\n"


def add_token(path: str | Path, caller: str, roles: Iterable[str]) -> str:
    """Appends a new token for `caller` to the file (created 0600) and returns the token,
    which is not stored anywhere: print it once."""
    token = new_token()
    entry = _check_entry(
        {"caller": caller, "roles": list(roles), "sha256": hash_token(token)}, "new token"
    )
    path = Path(path)
    if path.exists():
        parse_tokens(path.read_text(), str(path))  # refuse to append to a broken file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        out.write(format_entry(entry))
    return token


class TokenStore:
    """The tokens file, loaded and kept current: re-read when its mtime or size changes
    (checked at most every `recheck_s`). A file that turns unreadable or invalid keeps the
    last good entries (and the error is raised to the operator's log by `reload`)."""

    def __init__(self, path: str | Path, *, recheck_s: float = 1.0) -> None:
        self.path = Path(path)
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._entries: list[TokenEntry] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reload()  # a bad file at startup is the operator's error: raise it

    def reload(self) -> bool:
        """Re-reads the file if it changed; True when it did."""
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        entries = parse_tokens(self.path.read_text(), str(self.path))
        with self._lock:
            self._entries, self._stamp = entries, stamp
        return True

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._recheck_s:
            return
        self._checked = now
        try:
            self.reload()
        except (OSError, ValueError) as exc:
            import logging

            logging.getLogger("secant.auth").error(
                "tokens file unreadable; keeping the last good one",
                extra={"path": str(self.path), "error": str(exc)},
            )

    def lookup(self, token: str) -> Caller | None:
        """The caller holding `token`, or None. Compares every digest in constant time."""
        self._maybe_reload()
        digest = hash_token(token)
        found = None
        with self._lock:
            entries = self._entries
        for entry in entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return Caller(found.caller, found.roles) if found is not None else None


# -- the interceptor ---------------------------------------------------------------------


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


def _refusal_handler(handler: grpc.RpcMethodHandler, exc: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; it takes the request as raw
    bytes, so nothing an unauthenticated caller sent is parsed."""
    code, message = status_for(exc)

    async def deny(_request, context):
        await context.abort(code, message)

    async def deny_stream(_request, context):  # streaming handlers are async generators
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, response_serializer=serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, response_serializer=serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(deny_stream, response_serializer=serializer)


def _with_caller(handler: grpc.RpcMethodHandler, caller: Caller) -> grpc.RpcMethodHandler:
    """`handler` running with `caller` in the contextvar (set inside the RPC's own task)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            _current.set(caller)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            _current.set(caller)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    if handler.stream_stream is not None:
        inner_bidi = handler.stream_stream

        async def stream_stream(request_iterator, context):
            _current.set(caller)
            async for item in inner_bidi(request_iterator, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
    inner_client_stream = handler.stream_unary

    async def stream_unary(request_iterator, context):
        _current.set(caller)
        return await inner_client_stream(request_iterator, context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token and the method's role on every RPC but health/reflection."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if service in OPEN_SERVICES:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal_handler(handler, Unauthenticated(
                "this server needs a token: send metadata 'authorization: Bearer <token>'"
                " (secant --token / SECANT_TOKEN)"
            ))
        caller = self._tokens.lookup(token) if token else None
        if caller is None:
            return _refusal_handler(handler, Unauthenticated(
                "the bearer token is not valid on this server"
            ))
        if service == OPTIMIZER_SERVICE and method in METHOD_ROLES:
            role = METHOD_ROLES[method]
        else:
            role = "admin"
        if role is not None and role not in caller.roles:
            return _refusal_handler(handler, PermissionError(
                f"caller {caller.name!r} lacks the role {role!r} that {method} needs"
            ))
        return _with_caller(handler, caller)
