"""`pfanet serve`: the HTTP API and web page (`pfanet.serve`)."""

from __future__ import annotations

import argparse

from .common import add_model_options, fail, missing_extra, predict_options


def add(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API and web page",
        description="Serve the model over HTTP (FastAPI + uvicorn), loaded once:\n"
                    "  /               a web page: drop an image, see and download map, mask and cut-out\n"
                    "  POST /predict   multipart field 'file'; query output=map|mask|edge|cutout|overlay, threshold\n"
                    "                  -> image/png\n"
                    "  POST /predict/all  several outputs from one forward pass, as JSON (base64 PNGs)\n"
                    "  GET /health, /docs (OpenAPI)\n"
                    "Errors are JSON {\"detail\": ...}: 413 too large, 415 not an image, 422 bad parameter, 503 busy,\n"
                    "504 too slow.",
        epilog="example:\n"
               "  pfanet serve --port 8000 &\n"
               "  curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?output=cutout' -o cutout.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    add_model_options(p, batch_size=None)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload in MB (default 20; 413 beyond)")
    p.add_argument("--max-pixels", type=int, help="largest image in pixels (default 50 million; 413 beyond)")
    p.add_argument("--timeout", type=float, default=60, help="seconds a request may wait (default 60; 504 beyond)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="images in progress at once (default 8; more get 503 and retry)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    if missing := missing_extra("serve"):
        return fail(args, missing)
    from ..serve import serve

    serve(predict_options(args), args.host, args.port, args.max_upload_mb, args.max_pixels, args.timeout,
          args.max_queue, args.log_level)
    return 0
