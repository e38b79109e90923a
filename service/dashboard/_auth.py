"""Who is looking at the dashboard (a bearer token or a login session), and what keeps other
sites from acting in their name (same-origin POSTs carrying a CSRF token).

With a tokens file, a request names its caller by `Authorization: Bearer <token>` (scripts)
or by a session cookie that the login form hands out. Sessions live in this process only: the
cookie holds a random id, the token stays on the server and is looked up again in the tokens
file on every request, so a token removed from the file ends its sessions within a second
(TokenStore's recheck). A gateway restart logs everyone out.

Every POST needs a same-origin Origin (when the browser sends one) and, unless it came with a
bearer header, the form's CSRF token: the session's, or without tokens a per-process one
(loopback trust is ambient too: any page the user opens could otherwise post to 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from service.auth import Caller, TokenStore

SESSION_IDLE_S = 12 * 3600
MAX_SESSIONS = 10_000


@dataclass
class Session:
    token: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Viewer:
    """The caller of one request (None without auth) and how it proved who it is."""

    caller: Caller | None
    csrf: str  # what this viewer's forms carry
    session_id: str | None = None
    bearer: bool = False


class Sessions:
    """Login sessions of one dashboard, newest last; the oldest go past MAX_SESSIONS."""

    def __init__(self, tokens: TokenStore | None) -> None:
        self.tokens = tokens
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._secret = secrets.token_bytes(32)
        # Without auth every viewer shares one CSRF token, derived so it never leaves memory.
        self.anonymous_csrf = hmac.new(self._secret, b"anonymous", hashlib.sha256).hexdigest()

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def login(self, token: str) -> tuple[str, Caller] | None:
        """A new session for a valid token: (session id, caller), else None."""
        caller = self.tokens.lookup(token) if self.tokens is not None and token else None
        if caller is None:
            return None
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = Session(token)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id, caller

    def logout(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def viewer(self, authorization: str | None, session_id: str | None) -> Viewer | None:
        """The request's viewer, or None when auth is on and it proved nothing valid."""
        if self.tokens is None:
            return Viewer(None, self.anonymous_csrf)
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            caller = self.tokens.lookup(token.strip())
            return Viewer(caller, "", bearer=True) if caller is not None else None
        session = self._sessions.get(session_id) if session_id else None
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > SESSION_IDLE_S:
            self.logout(session_id)
            return None
        caller = self.tokens.lookup(session.token)
        if caller is None:  # the token left the tokens file
            self.logout(session_id)
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return Viewer(caller, session.csrf, session_id=session_id)

    @staticmethod
    def csrf_ok(viewer: Viewer, submitted: str) -> bool:
        if viewer.bearer:  # a header no other site can make a browser send
            return True
        return bool(submitted) and hmac.compare_digest(viewer.csrf, submitted)
