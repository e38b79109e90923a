"""The dashboard's Starlette app: pages, event streams and the cancel action, all reading
through the gateway's JobManager (get/list/watch/cancel with the viewer's rights).

Routes: /jobs (table; /jobs/stream pushes its rows), /jobs/{id} (one job; /jobs/{id}/events
streams its events as server-sent events, resumable by Last-Event-ID), POST
/jobs/{id}/cancel, /login and POST /logout (with --tokens), /api/jobs[/{id}] (JSON, for
scripts with a bearer header), /static (vendored uPlot, the page script and style).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from service.auth import TokenStore
from service.dashboard import _views as views
from service.dashboard._auth import Sessions, Viewer
from service.errors import JobNotFound
from service.jobs import JobManager
from service.store import JobStore

log = logging.getLogger("secant.dashboard")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Filtering by caller scans the store's pages (the job manager lists by state, method and
# batch only); it stops after this many jobs and offers the next page from there.
OWNER_SCAN_LIMIT = 5000
MAX_FORM_BYTES = 16 * 1024
HEARTBEAT_S = 15.0
# Live events are sent at most this often, batched: a solve reports up to thousands of
# iterates a second, a browser needs ten updates.
COALESCE_S = 0.1
MAX_EVENTS_PER_MESSAGE = 2000
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
_CLOSED = object()  # the dashboard is shutting down
_ENDED = object()  # the job's event log is complete


class LoginRequired(Exception):
    """The dashboard needs a token and this request brought none that is valid."""


def create_app(
    jobs: JobManager,
    store: JobStore,
    *,
    tokens: TokenStore | None = None,
    secure: bool = False,
    loopback_only: bool = True,
    list_poll_s: float = 1.0,
) -> Starlette:
    """The ASGI app. `store` is read for one thing only, the problem a job was submitted
    with, after JobManager.get has said the viewer may see the job."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    sessions = Sessions(tokens)
    version = _asset_version()

    def cookie_name(request: Request) -> str:
        # Cookies ignore ports: two gateways on one host must not share a session slot.
        port = (request.scope.get("server") or ("", 0))[1]
        return f"secant_session_{port}"

    def viewer_of(request: Request) -> Viewer:
        viewer = sessions.viewer(request.headers.get("authorization"),
                                 request.cookies.get(cookie_name(request)))
        if viewer is None:
            raise LoginRequired()
        return viewer

    def still_allowed(request: Request) -> bool:
        """For open streams: a token removed from the tokens file ends them too."""
        return sessions.viewer(request.headers.get("authorization"),
                               request.cookies.get(cookie_name(request))) is not None

    def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200,
             viewer: Viewer | None = None) -> Response:
        context.setdefault("viewer", viewer)
        context.update(auth=sessions.enabled, version=version)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # -- the jobs table ------------------------------------------------------------------

    async def rows_for(viewer: Viewer, query) -> tuple[list[dict], str, dict]:
        try:
            state = views.parse_state(query.get("state", ""))
            size = int(query.get("size") or PAGE_SIZE)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise HTTPException(400, f"size: between 1 and {MAX_PAGE_SIZE}, got {size}")
        filters = {
            "state": views.state_name(state) if state else "",
            "method": query.get("method", "").strip(),
            "batch": query.get("batch", "").strip(),
            "caller": query.get("caller", "").strip(),
            "sort": query.get("sort", "-created").strip() or "-created",
            "size": size,
        }
        token = query.get("page", "")
        caller = viewer.caller
        owner = filters["caller"] or None
        found, next_token = [], ""
        if owner is None or caller is None or caller.is_admin or owner == caller.name:
            scanned = 0
            while True:
                try:
                    listing = await jobs.list(
                        state=state, method=filters["method"], batch_id=filters["batch"],
                        page_size=size, page_token=token, caller=caller,
                    )
                except ValueError as exc:  # a page token this server did not issue
                    raise HTTPException(400, str(exc)) from None
                found += [j for j in listing.jobs if owner is None or j.owner == owner]
                scanned += len(listing.jobs)
                token = next_token = listing.next_page_token
                if owner is None or not token or len(found) >= size or scanned >= OWNER_SCAN_LIMIT:
                    break
        try:
            rows = views.sort_rows([views.job_row(j) for j in found], filters["sort"])
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return rows, next_token, filters

    def link(filters: dict, **changes) -> str:
        query = {k: v for k, v in {**filters, **changes}.items() if v not in ("", None)}
        if query.get("sort") == "-created":
            query.pop("sort")
        if query.get("size") == PAGE_SIZE:
            query.pop("size")
        return "/jobs" + ("?" + urllib.parse.urlencode(query) if query else "")

    async def jobs_page(request: Request) -> Response:
        viewer = viewer_of(request)
        rows, next_token, filters = await rows_for(viewer, request.query_params)
        sort = filters["sort"]
        headers = []
        for key, label in (("kind", "kind"), ("method", "method"), ("n", "n"),
                           ("state", "state"), ("owner", "caller"), ("created", "created"),
                           ("duration", "duration")):
            toggled = key if sort == f"-{key}" else f"-{key}"
            arrow = "▼" if sort == f"-{key}" else "▲" if sort == key else ""
            headers.append({"key": key, "label": label, "arrow": arrow,
                            "href": link(filters, sort=toggled, page="")})
        return page(request, "jobs.html", {
            "rows": rows, "filters": filters, "states": views.STATES, "headers": headers,
            "next_href": link(filters, page=next_token) if next_token else "",
            "first_href": link(filters, page="") if request.query_params.get("page") else "",
            "show_caller_filter": viewer.caller is None or viewer.caller.is_admin,
            "methods": sorted({r["method"] for r in rows if r["method"]}),
        }, viewer=viewer)

    async def jobs_stream(request: Request) -> Response:
        viewer = viewer_of(request)
        query = request.query_params
        await rows_for(viewer, query)  # bad filters are a 400 now, not a dead stream later
        closing: asyncio.Event = request.app.state.closing

        async def body():
            last = None
            yield "retry: 2000\n\n"
            quiet = 0.0
            while not closing.is_set() and still_allowed(request):
                try:
                    rows, _, _ = await rows_for(viewer, query)
                except Exception:  # headers are sent: end the stream, the page reconnects
                    log.exception("dashboard: the jobs table stream failed")
                    return
                html = templates.get_template("_rows.html").render(rows=rows)
                if html != last:
                    last, quiet = html, 0.0
                    yield _sse("rows", json.dumps({"html": html, "count": len(rows)}))
                elif quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield ": ping\n\n"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), list_poll_s)
                quiet += list_poll_s

        return _event_stream(body())

    # -- one job -------------------------------------------------------------------------

    async def visible_job(viewer: Viewer, job_id: str):
        if not job_id or len(job_id) > 128:
            raise JobNotFound(job_id)
        return await jobs.get(job_id, caller=viewer.caller)  # JobNotFound: 404

    async def job_page(request: Request) -> Response:
        viewer = viewer_of(request)
        job = await visible_job(viewer, request.path_params["job_id"])
        blob = await asyncio.to_thread(store.get_problem, job.job_id)
        try:
            problem = views.problem_view(job.kind, blob)
        except Exception:  # a record this version cannot read still shows the rest
            log.warning("dashboard: unreadable problem", extra={"job_id": job.job_id})
            problem = None
        row = views.job_row(job)
        if job.kind == "train":
            page_kind = "train"
        elif (problem and problem.get("batch")) or job.result.HasField("batch"):
            page_kind = "batch"
        else:
            page_kind = "solve"
        context = {
            "job": row, "page_kind": page_kind, "problem": problem,
            "labels": dict(job.labels),
            "started_text": views.iso(views.seconds(job.started)),
            "finished_text": views.iso(views.seconds(job.finished)),
            "result": views.result_view(job.result) if job.HasField("result") else None,
            "failure": {"code": job.failure.code, "message": job.failure.message}
            if job.HasField("failure") else None,
            "train": views.train_result_view(job.train_result)
            if job.HasField("train_result") else None,
            "can_cancel": not row["terminal"],
            "config": {"id": job.job_id, "kind": page_kind, "terminal": row["terminal"],
                       "events": f"/jobs/{job.job_id}/events"},
        }
        return page(request, "job.html", context, viewer=viewer)

    async def job_events(request: Request) -> Response:
        viewer = viewer_of(request)
        job = await visible_job(viewer, request.path_params["job_id"])
        raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        try:
            after = max(0, int(raw))
        except ValueError:
            raise HTTPException(400, f"after: a sequence number, got {raw!r}") from None
        closing: asyncio.Event = request.app.state.closing
        events = jobs.watch(job.job_id, after, caller=viewer.caller)
        return _event_stream(_job_event_stream(events, closing, lambda: still_allowed(request)))

    async def cancel(request: Request) -> Response:
        viewer = viewer_of(request)
        form = await _form(request)
        if not sessions.csrf_ok(viewer, form.get("csrf", "")):
            raise HTTPException(403, "This form is stale or came from another page: reload the"
                                " job's page and press Cancel again.")
        job = await visible_job(viewer, request.path_params["job_id"])
        await jobs.cancel(job.job_id, caller=viewer.caller)
        log.info("job cancel asked from the dashboard",
                 extra={"job_id": job.job_id,
                        "caller": viewer.caller.name if viewer.caller else ""})
        return RedirectResponse(f"/jobs/{job.job_id}", status_code=303)

    # -- login ---------------------------------------------------------------------------

    async def login(request: Request) -> Response:
        target = _safe_next(request.query_params.get("next", "/jobs"))
        if not sessions.enabled:
            return RedirectResponse(target, status_code=303)
        if request.method == "GET":
            return page(request, "login.html", {"next": target, "error": ""})
        form = await _form(request)
        target = _safe_next(form.get("next", "/jobs"))
        made = sessions.login(form.get("token", "").strip())
        if made is None:
            return page(request, "login.html", {
                "next": target, "error": "That token is not valid on this server."},
                status_code=401)
        session_id, caller = made
        log.info("dashboard login", extra={"caller": caller.name})
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(cookie_name(request), session_id, httponly=True, samesite="lax",
                            secure=secure, path="/")
        return response

    async def logout(request: Request) -> Response:
        viewer = viewer_of(request)
        form = await _form(request)
        if not sessions.csrf_ok(viewer, form.get("csrf", "")):
            raise HTTPException(403, "This form is stale: reload the page and try again.")
        sessions.logout(viewer.session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(cookie_name(request), path="/")
        return response

    # -- JSON for scripts ----------------------------------------------------------------

    async def api_jobs(request: Request) -> Response:
        viewer = viewer_of(request)
        rows, next_token, _ = await rows_for(viewer, request.query_params)
        return JSONResponse({"jobs": rows, "next_page": next_token})

    async def api_job(request: Request) -> Response:
        viewer = viewer_of(request)
        job = await visible_job(viewer, request.path_params["job_id"])
        body = views.job_row(job)
        if job.HasField("result"):
            result = views.result_view(job.result)
            body["result"] = result
        if job.HasField("failure"):
            body["failure"] = {"code": job.failure.code, "message": job.failure.message}
        return JSONResponse(_json_safe(body))

    async def index(request: Request) -> Response:
        return RedirectResponse("/jobs", status_code=303)

    # -- errors are pages ----------------------------------------------------------------

    def wants_json(request: Request) -> bool:
        path = request.url.path
        return path.startswith("/api/") or path.endswith(("/events", "/stream"))

    def error(request: Request, status: int, title: str, message: str) -> Response:
        if wants_json(request):
            return JSONResponse({"error": title, "message": message}, status_code=status)
        viewer = None
        with contextlib.suppress(LoginRequired):
            viewer = viewer_of(request)
        return page(request, "error.html", {"status": status, "title": title,
                                            "message": message}, status_code=status,
                    viewer=viewer)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        titles = {400: "Bad request", 403: "Not allowed", 404: "Not found",
                  405: "Method not allowed", 413: "Too large"}
        message = exc.detail if isinstance(exc.detail, str) else ""
        if exc.status_code == 404 and message in ("", "Not Found"):
            message = f"There is no page at {request.url.path}."
        if exc.status_code == 405:
            message = "This address only takes a POST from the dashboard's own forms."
        response = error(request, exc.status_code, titles.get(exc.status_code, "Error"),
                         message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_not_found(request: Request, exc: JobNotFound) -> Response:
        return error(request, 404, "Job not found",
                     f"There is no job {exc.job_id!r} that you may see.")

    async def on_login_required(request: Request, exc: LoginRequired) -> Response:
        if wants_json(request) or request.method != "GET":
            return JSONResponse({"error": "unauthenticated",
                                 "message": "log in at /login or send 'Authorization: Bearer"
                                 " <token>'"}, status_code=401,
                                headers={"www-authenticate": "Bearer"})
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urllib.parse.urlencode({"next": target}),
                                status_code=303)

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("dashboard request failed", exc_info=exc,
                  extra={"path": request.url.path})
        return error(request, 500, "Something went wrong",
                     "The dashboard hit an error; it is in the gateway's log.")

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/jobs", jobs_page),
            Route("/jobs/stream", jobs_stream),
            Route("/jobs/{job_id}", job_page),
            Route("/jobs/{job_id}/events", job_events),
            Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
            Route("/api/jobs", api_jobs),
            Route("/api/jobs/{job_id}", api_job),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ],
        middleware=[Middleware(_Guard, loopback_only=loopback_only, secure=secure)],
        exception_handlers={
            HTTPException: on_http_error,
            JobNotFound: on_not_found,
            LoginRequired: on_login_required,
            Exception: on_crash,
        },
    )
    app.state.closing = asyncio.Event()
    return app


async def _job_event_stream(events, closing: asyncio.Event, allowed: Callable[[], bool]):
    """A job's events as SSE messages, batched (at most one message per COALESCE_S), then
    `end` when the job has ended; stops early when the dashboard closes or the viewer's
    token is no longer valid."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dashboard: watching a job failed")
        finally:
            queue.put_nowait(_ENDED)

    async def close_on_shutdown() -> None:
        await closing.wait()
        queue.put_nowait(_CLOSED)

    pumping = asyncio.create_task(pump())
    closer = asyncio.create_task(close_on_shutdown())
    try:
        yield "retry: 2000\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                item = None
            if not allowed():
                return
            if item is None:
                yield ": ping\n\n"
                continue
            batch, stop = [], None
            while True:
                if item is _ENDED or item is _CLOSED:
                    stop = item
                    break
                batch.append(views.event_json(item))
                if len(batch) >= MAX_EVENTS_PER_MESSAGE or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield _sse("events", json.dumps(batch), event_id=batch[-1]["seq"])
            if stop is _ENDED:
                yield _sse("end", "{}")
                return
            if stop is _CLOSED:
                return
            await asyncio.sleep(COALESCE_S)
    finally:
        for task in (pumping, closer):
            task.cancel()
        await asyncio.gather(pumping, closer, return_exceptions=True)


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def _event_stream(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={
        "cache-control": "no-store", "x-accel-buffering": "no"})


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the dashboard's forms have a few short fields)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind not in ("application/x-www-form-urlencoded", ""):
        raise HTTPException(400, "Forms are sent urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "That form is larger than any this dashboard sends.")
    try:
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raise HTTPException(400, "The form is not UTF-8.") from None
    return dict(pairs)


def _safe_next(target: str) -> str:
    """Only a path on this site: no scheme, no host, no '//' (an open redirect otherwise)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    return target


def _json_safe(value):
    if isinstance(value, float):
        return views.finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _asset_version() -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((HERE / "static").glob("*.*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


class _Guard:
    """Pure ASGI middleware, so event streams pass through unbuffered: answers only to
    loopback host names when bound to loopback (a DNS-rebinding page cannot read it),
    refuses cross-site POSTs, and adds the security headers."""

    def __init__(self, app, *, loopback_only: bool, secure: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.scheme = "https" if secure else "http"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        refusal = None
        if self.loopback_only and _hostname(host) not in LOOPBACK_NAMES:
            refusal = (421, "This dashboard answers only to localhost names (127.0.0.1,"
                       " localhost, [::1]).")
        elif scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            fetch_site = headers.get("sec-fetch-site")
            if origin is not None and origin != f"{self.scheme}://{host}":
                refusal = (403, "Refused: this request came from another site.")
            elif fetch_site is not None and fetch_site not in ("same-origin", "none"):
                refusal = (403, "Refused: this request came from another site.")
        if refusal is not None:
            status, message = refusal
            await _plain(send, status, message)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if not scope["path"].startswith("/static/"):
                    extra.append((b"cache-control", b"no-store"))
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in extra if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _plain(send, status: int, message: str) -> None:
    body = (f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{message}</p>"
            ).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
