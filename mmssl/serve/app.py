"""The HTTP API and web page of ``mmssl serve`` (``mmssl.commands.serve``), with FastAPI.

    GET  /                  the search page (plain HTML and JS from ``static/``, works offline)
    POST /search/audio      multipart: ``file`` (any format PyAV decodes), ``k`` -> top images
    POST /search/text       JSON ``{"text": ..., "k": ...}`` (a run with a text tower)
    GET  /items/{id}        an indexed image (by group) or spoken caption (by id)
    GET  /health            model, index size, search kind, server processes
    GET  /docs, /openapi.json  the API, described by FastAPI

Every error is a JSON object ``{"error": "..."}`` that names the problem, with a 4xx status
for anything a request got wrong (400 malformed, 404 unknown id, 413 too large, 422 not usable
audio or text) and 500 only for a bug, without a traceback. A body larger than the upload limit
is refused from its ``Content-Length``, or once that many bytes have arrived, before it is parsed.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmssl import __version__
from mmssl.constants import SAMPLE_RATE
from mmssl.data.io import decode_audio_bytes
from mmssl.errors import ConfigError, DataError
from mmssl.serve.search import SearchService

STATIC = resources.files("mmssl.serve") / "static"
UPLOAD_FIELD = "file"


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=1000, description="what to look for, in words")
    k: int = Field(10, ge=1, description="images to return")


def _too_large(size: int, limit: int) -> str:
    return f"the request body ({size / 1e6:.1f} MB or more) is over the {limit / 1e6:g} MB upload limit"


class _TooLarge(StarletteHTTPException):
    """Raised where the body is read, so FastAPI's form parsing passes it on as it is (413)."""

    def __init__(self, size: int, limit: int):
        super().__init__(413, _too_large(size, limit))


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 without reading it
    (declared ``Content-Length``) or as soon as the limit is passed (chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(seen, self.limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int) -> None:
        await _error(413, _too_large(size, self.limit))({"type": "http"}, None, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        if e.get("type") == "missing" and where == UPLOAD_FIELD:
            parts.append(f"no audio file in the multipart field {UPLOAD_FIELD!r}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "the request does not fit the API"


def create_app(
    service: SearchService,
    max_upload_mb: float = 20.0,
    max_seconds: float = 60.0,
    max_k: int = 100,
    workers: int = 1,
) -> FastAPI:
    """The FastAPI application answering for ``service`` (in one of ``workers`` processes)."""
    # FastAPI's /docs page loads Swagger UI from a CDN; fastapi-offline serves the same pages
    # from files in its wheel, so the API's documentation works on a machine with no network
    app = FastAPIOffline(
        title="mmssl speech-image search",
        version=__version__,
        description="The images a spoken (or written) caption describes, in an index made by `mmssl index`.",
    )
    limits = {"max_upload_mb": max_upload_mb, "max_seconds": max_seconds, "max_k": max_k}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return _error(422, _validation_message(err))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        return _error(500, f"internal error ({type(err).__name__}); the server keeps serving")

    def check_k(k: int) -> None:
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}; got {k}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    server = {"workers": workers, "pid": os.getpid()}  # the process that answered

    @app.get("/health")
    def health() -> dict:
        """Model, index size, search kind, the limits on a query and the server processes."""
        return {**service.describe(), "limits": limits, "server": server}

    @app.post("/search/audio")
    async def search_audio(
        request: Request,
        file: Annotated[
            UploadFile | None, File(description="a spoken caption: wav, flac, mp3, ogg, webm")
        ] = None,
        k: Annotated[int, Form(description="images to return")] = 10,
    ) -> dict:
        """The ``k`` images whose embeddings best match the spoken query, best first."""
        if file is None:
            form = await request.form()
            fields = ", ".join(sorted(form.keys())) or "none"
            raise HTTPException(
                422, f"no audio file in the multipart field {UPLOAD_FIELD!r} (fields sent: {fields})"
            )
        check_k(k)
        data = await file.read()
        name = file.filename or "upload"
        start = time.perf_counter()
        try:
            wave = await run_in_threadpool(decode_audio_bytes, data, name, SAMPLE_RATE, max_seconds)
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        decoded = time.perf_counter()
        warnings: list[str] = []
        try:
            query = await run_in_threadpool(service.embed_audio, wave, name, warnings)
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        return _answer(
            service,
            query,
            k,
            start,
            decoded,
            {"name": name, "seconds": round(wave.shape[0] / SAMPLE_RATE, 3)},
            warnings,
        )

    @app.post("/search/text")
    async def search_text(query: TextQuery) -> dict:
        """The ``k`` images best matching a written caption (runs trained with the caption term)."""
        check_k(query.k)
        start = time.perf_counter()
        try:
            embedded = await run_in_threadpool(service.embed_text, query.text)
        except ConfigError as err:
            raise HTTPException(404, str(err)) from None
        return _answer(service, embedded, query.k, start, start, {"text": query.text}, [])

    @app.get("/items/{item_id:path}")
    def item(item_id: str):
        """An indexed image (id: its group) or spoken caption (id: its record id)."""
        found = service.items.get(item_id)
        if found is None:
            raise HTTPException(404, f"no item {item_id!r} in this index")
        if not found.path.is_file():
            raise HTTPException(
                404, f"the {found.kind} of item {item_id!r} is no longer where it was indexed"
            )
        return FileResponse(found.path, media_type=found.media_type)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_middleware(BodyLimit, limit=int(max_upload_mb * 1e6))
    return app


def _answer(
    service: SearchService, query, k: int, start: float, decoded: float, described: dict, warnings: list[str]
) -> dict:
    embedded = time.perf_counter()
    results, search_ms = service.top(query, k)
    total = time.perf_counter()
    return {
        "query": described,
        "k": k,
        "results": results,
        "timing_ms": {
            "decode": round(1000 * (decoded - start), 2),
            "embed": round(1000 * (embedded - decoded), 2),
            "search": round(search_ms, 3),
            "total": round(1000 * (total - start), 2),
        },
        "warnings": warnings,
    }
