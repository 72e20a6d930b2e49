"""`latentpatch serve`'s web layer: a thin FastAPI app over a `Workbench` (DESIGN.md, "Reports and the app").

What it promises, and the tests check:
- it serves only its own files: the pages and scripts in `static/` beside this module, read once at
  start-up into a table looked up by name (no path from a request reaches the filesystem), and the
  shared style sheet of the report's templates;
- request bodies are capped (`AppLimits.max_body_bytes`, HTTP 413) and so are prompt token counts;
- every typed error (`LatentpatchError`) becomes HTTP 400 with its message as JSON, a busy model HTTP
  409, anything else HTTP 500 with one line (the traceback goes to the server's log, never the page);
- the Host header must name this machine (a DNS-rebinding page cannot drive the app from a browser).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from latentpatch.app import experiments
from latentpatch.app.jobs import AppInputError, BusyError
from latentpatch.app.workbench import Workbench
from sae.errors import LatentpatchError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
"""The app's own pages, script and style (plain files: no build step, no CDN)."""
PAGES = {"": "index.html", "latents": "latents.html", "patch": "patch.html", "steer": "steer.html",
         "circuits": "circuits.html"}
"""URL path -> page file."""
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                               "frame-ancestors 'none'"}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "testserver")
MAX_WAIT_S = 10.0
"""Longest a long poll of a job waits for news."""


def static_files() -> dict[str, tuple[bytes, str]]:
    """Name -> (content, media type) of every file the app serves, read once: the table is all a request can reach."""
    from patching.inspect.pages import TEMPLATES

    files = {path.name: (path.read_bytes(), MEDIA[path.suffix]) for path in sorted(STATIC.iterdir())
             if path.suffix in MEDIA}
    files["card.css"] = ((TEMPLATES / "style.css").read_bytes(), MEDIA[".css"])  # the report's cards look the same here
    return files


async def read_body(request: Request) -> dict[str, Any]:
    """The request body as one JSON object, or `AppInputError` (HTTP 400) saying what came instead."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise AppInputError(f"the request body is not JSON ({err})") from None
    if not isinstance(body, dict):
        raise AppInputError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


BODY = Depends(read_body)
"""The JSON-object body every POST endpoint takes."""


def create_app(bench: Workbench, *, allowed_hosts: tuple[str, ...] = LOCAL_HOSTS) -> Any:
    """The FastAPI application serving `bench`."""
    app = FastAPI(title="latentpatch", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=bench.limits.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    files = static_files()

    @app.exception_handler(LatentpatchError)
    async def typed_error(request: Request, err: LatentpatchError) -> JSONResponse:
        status = 409 if isinstance(err, BusyError) else 400
        return JSONResponse({"error": str(err), "type": type(err).__name__}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse({"error": f"bad request ({where})", "type": "RequestValidationError"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.error("request %s failed", request.url.path, exc_info=err)
        return JSONResponse({"error": "internal error (the server's log has the details)", "type": "InternalError"},
                            status_code=500)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return bench.info()

    @app.post("/api/search")
    def search(body: dict = BODY) -> dict[str, Any]:
        return bench.search(body.get("sae", 0), body.get("text"))

    @app.get("/api/card/{sae}/{latent}", response_class=HTMLResponse)
    def card(sae: int, latent: int) -> str:
        return bench.card(sae, latent)

    @app.post("/api/sweep", status_code=202)
    def sweep(body: dict = BODY) -> dict[str, Any]:
        return experiments.start_sweep(bench, body).to_dict()

    @app.post("/api/steer", status_code=202)
    def steer(body: dict = BODY) -> dict[str, Any]:
        return experiments.start_steer(bench, body).to_dict()

    @app.post("/api/circuit", status_code=202)
    def circuit(body: dict = BODY) -> dict[str, Any]:
        return experiments.start_circuit(bench, body).to_dict()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str, since: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """The job's state and its events after the first `since`; with `wait` (seconds, at most
        `MAX_WAIT_S`) a long poll, answered as soon as there is a new event or the job ends."""
        found = bench.runner.get(job_id)
        if wait > 0:
            found.wait_for(max(since, 0), min(wait, MAX_WAIT_S))
        return found.to_dict(since=max(since, 0))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return bench.runner.cancel(job_id).to_dict()

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, "no such file")
        content, media = files[name]
        return Response(content, media_type=media)

    @app.get("/{page}")
    @app.get("/", include_in_schema=False)
    def page(page: str = "") -> Response:
        if page not in PAGES:
            raise HTTPException(404, "no such page")
        content, media = files[PAGES[page]]
        return Response(content, media_type=media)

    return app


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets HTTP 413, announced (Content-Length) or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": f"request body over {limit} bytes", "type": "RequestTooLarge"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
