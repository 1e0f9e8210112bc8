"""`pfanet serve`: an HTTP API (FastAPI) and a web page over one `Predictor`.

- `POST /predict?output=map|mask|edge|cutout|overlay[&threshold=T]`, multipart field `file` -> one PNG.
- `POST /predict/all?outputs=map,mask,cutout[&threshold=T]` -> JSON with several PNGs (base64) from one forward pass;
  the web page uses it.
- `GET /health`, `GET /docs` (OpenAPI), `GET /` the web page (pfanet/static, no external resources). The Swagger UI
  of /docs loads its JavaScript and CSS from this server too (the files of the fastapi-offline package), so it works
  without internet. (No /redoc: ReDoc's bundle fetches its logo from a CDN.)

The model is loaded once, before the server starts listening. Each request decodes, predicts and encodes in a worker
thread, so the event loop stays free; the Predictor's lock runs one forward pass at a time. At most `max_queue`
requests are in the house at once (more get 503 at once rather than piling up), and a request that waits longer than
`timeout_s` gets 504. Uploads are limited in bytes (413) and in pixels (413, checked before decoding); anything that
is not a decodable image gets 415; bad parameters 422. The client's file name is never used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import pathlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import fastapi_offline
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .io import ImageError, ImageTooLarge, load_image
from .options import PredictOptions
from .outputs import MEDIA_TYPES, OUTPUT_KINDS, Rendered, parse_kinds, predict_outputs
from .predictor import Predictor

STATIC = pathlib.Path(__file__).parent / "static"
# Swagger UI's bundle, shipped by fastapi-offline: /docs loads it from this server, not from a CDN
DOCS_STATIC = pathlib.Path(fastapi_offline.__file__).parent / "static"
# Uploads above this many pixels get 413 before decoding. Lower than `pfanet.io.MAX_PIXELS` (100 MP, the limit for
# files a user gives a command): uploads come from anyone, and up to max_queue of them are decoded at once; a 50 MP
# photo decodes to 150 MB of RGB, so 8 in flight stay near 1.2 GB. Beyond that, resize before uploading.
MAX_PIXELS = 50_000_000
# The page and its script come from this server only; blob: URLs carry the results to <img> and the download links.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "connect-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'none'")

OutputKind = Literal[OUTPUT_KINDS]  # type: ignore[valid-type]
Threshold = Annotated[float | None, Query(ge=0, le=255, description="mask threshold 0..255; default adaptive "
                                                                    "(2 x the map's mean, clipped to [1, 255])")]
Upload = Annotated[UploadFile, File(description="the image (JPEG, PNG, WebP, TIFF, BMP, GIF ...)")]
# The server answers in PNG only (lossless, and what every browser shows); WebP is for files (`--format webp`).
FORMAT = "png"
PNG_RESPONSE = {200: {"content": {MEDIA_TYPES[FORMAT]: {}}, "description": "the rendered PNG"}}
ERRORS = {413: {"description": "upload or image too large"}, 415: {"description": "not a decodable image"},
          503: {"description": "busy, retry"}, 504: {"description": "took too long"}}


class UploadLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 with a JSON message.

    A Content-Length over the limit is answered before any of the body is read; a body without one (chunked) is
    counted as it streams in and cut off at the limit. (FastAPI's own `max_body_size` answers the first case in plain
    text only.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.message = f"upload larger than the limit of {max_bytes / 2**20:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.message}, 413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.message)  # FastAPI re-raises HTTPExceptions from body parsing
            return message

        await self.app(scope, counted, send)


class Service:
    """The model and the limits: runs one upload through decode -> `pfanet.outputs.predict_outputs` (predict ->
    render -> PNG) in a worker thread."""

    def __init__(self, predictor: Predictor, max_pixels: int, timeout_s: float, max_queue: int):
        self.predictor, self.max_pixels, self.timeout_s = predictor, max_pixels, timeout_s
        self.max_queue = max_queue
        self.slots = threading.BoundedSemaphore(max_queue)
        self.pool = ThreadPoolExecutor(max_queue, thread_name_prefix="pfanet-predict")

    def _work(self, data: bytes, kinds: tuple[str, ...], threshold: float | None) -> Rendered:
        rgb = load_image(data, name="upload", max_pixels=self.max_pixels)
        return predict_outputs(self.predictor, [rgb], kinds, FORMAT, threshold)[0]

    async def run(self, upload: UploadFile, kinds: tuple[str, ...], threshold: float | None) -> Rendered:
        data = await upload.read()
        if not self.slots.acquire(blocking=False):
            raise HTTPException(503, f"busy: {self.max_queue} images are already being processed; retry shortly",
                                headers={"Retry-After": "2"})
        try:
            job = self.pool.submit(self._work, data, kinds, threshold)
        except BaseException:
            self.slots.release()
            raise
        # The slot is freed when the work ends (or is cancelled unstarted), not when a timed-out request gives up.
        job.add_done_callback(lambda _: self.slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), self.timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"the prediction took longer than {self.timeout_s:g} s") from None
        except ImageTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except ImageError as e:
            raise HTTPException(415, str(e)) from None


def create_app(predictor: Predictor, max_upload_mb: float = 20, max_pixels: int = MAX_PIXELS,
               timeout_s: float = 60, max_queue: int = 8) -> FastAPI:
    """The FastAPI application around a loaded `predictor`.

    Args:
        max_upload_mb: largest request body in MiB (413 beyond, before the body is read when Content-Length says so).
        max_pixels: largest image in pixels (413 beyond, checked from the header before decoding).
        timeout_s: longest wait for a prediction (504 beyond).
        max_queue: most images decoded/predicted/queued at once (503 beyond).
    """
    service = Service(predictor, max_pixels, timeout_s, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="PFANet", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Salient object detection (PFANet, CVPR 2019): saliency maps, masks, transparent "
                              "cut-outs. Upload an image as the multipart field `file`.")
    app.state.service = service

    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP})

    # The page's assets by name, listed once: a client's path is only a key into this table. (StaticFiles would
    # resolve it on disk, stat-ing e.g. /tmp/x for /static/..%2f..%2ftmp%2fx before refusing it.)
    assets = {p.name: p for folder in (DOCS_STATIC, STATIC) for p in folder.iterdir() if p.is_file()}

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in assets:
            raise HTTPException(404, "Not Found")
        return FileResponse(assets[name])

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url="/static/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui.css", swagger_favicon_url="/static/favicon.png")

    @app.get("/health")
    def health() -> dict:
        """Liveness and what is loaded: the model's input convention and the server's limits."""
        return {"status": "ok", "version": __version__, "device": str(predictor.device), "backend": predictor.backend,
                "backend_reason": predictor.backend_reason, "input": predictor.spec.to_dict(),
                "weights": predictor.source, "flip": predictor.flip,
                "limits": {"max_upload_mb": max_upload_mb, "max_pixels": max_pixels, "timeout_s": timeout_s,
                           "max_queue": max_queue}}

    @app.post("/predict", response_class=Response, responses={**PNG_RESPONSE, **ERRORS})
    async def predict(file: Upload, output: OutputKind = "map", threshold: Threshold = None) -> Response:
        """One rendering of the uploaded image as PNG, at the image's size (EXIF orientation applied)."""
        result = await service.run(file, (output,), threshold)
        return Response(result.files[output], media_type=MEDIA_TYPES[FORMAT],
                        headers={"X-Threshold": f"{result.threshold:.2f}"})

    @app.post("/predict/all", responses=ERRORS)
    async def predict_all(file: Upload, threshold: Threshold = None,
                          outputs: Annotated[str, Query(description=f"comma-separated, from {', '.join(OUTPUT_KINDS)}")
                                             ] = "map,mask,cutout") -> dict:
        """Several renderings from one forward pass, as base64 PNGs: {width, height, threshold, images: {kind: ...}}."""
        try:
            kinds = parse_kinds(outputs)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        result = await service.run(file, kinds, threshold)
        return {"width": result.width, "height": result.height, "threshold": round(result.threshold, 2),
                "images": {k: base64.b64encode(v).decode() for k, v in result.files.items()}}

    return app


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread, e.g. for tests or a notebook.

    `with BackgroundServer(app) as url: httpx.get(url + "/health")`; port 0 picks a free port (bound before uvicorn
    starts, so there is no race for it).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(options: PredictOptions | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 20, max_pixels: int | None = None, timeout_s: float = 60, max_queue: int = 8,
          log_level: str = "info") -> None:
    """Load the model `options` describe, then serve until interrupted (`max_pixels` None: `MAX_PIXELS`)."""
    import uvicorn

    predictor = (options or PredictOptions()).predictor()
    app = create_app(predictor, max_upload_mb, max_pixels or MAX_PIXELS, timeout_s, max_queue)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
