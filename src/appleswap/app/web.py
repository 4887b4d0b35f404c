"""``appleswap app``: the web UI (Gradio), served on 127.0.0.1 unless ``--listen`` says otherwise.

Upload source photo(s) and a target photo or video, click the face to replace in the gallery, adjust the
options, swap: a photo comes back as a before/after slider, a video as a seekable player; both are labelled and
watermarked like the CLI's outputs. Jobs wait in Gradio's queue (the page shows the position) and run on
``--workers`` workers; a job shows per-step (photo) or per-frame (video) progress and can be cancelled.
Requests from other sites (Origin) or for other host names (DNS rebinding) are refused; uploads are limited by
size (``--max-upload-mb``) and pixel count (``--max-pixels``); temporary files are removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appleswap.app.web_jobs import MAX_PIXELS, WebJobs, engine_cache
from appleswap.cli_common import HelpFormatter, common_parser

log = logging.getLogger(__name__)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_UPLOAD_MB = 512


def _hostname(netloc: str) -> str:
    """``[::1]:7860`` -> ``::1``; ``Example.com:80`` -> ``example.com``."""
    return (urlsplit("//" + netloc).hostname or "").lower()


def _origin_netloc(origin: str) -> tuple[str, int | None]:
    parts = urlsplit(origin)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.hostname or "").lower(), parts.port or default


class SameOriginGuard:
    """ASGI middleware: 403 for a Host this server does not answer to, or an Origin other than its own.

    Gradio only withholds CORS headers from other origins, so a cross-site form POST would still run and a DNS
    rebinding page (its own name resolving to 127.0.0.1) would be same-origin; this refuses both.
    ``allowed_hosts`` None accepts any Host (``--listen`` without ``--allowed-host``).
    """

    def __init__(self, app: Any, allowed_hosts: frozenset[str] | None = LOCAL_HOSTS) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    def refusal(self, headers: Any) -> str | None:
        host = headers.get("host", "")
        if self.allowed_hosts is not None and _hostname(host) not in self.allowed_hosts:
            return "unknown Host header"
        origin = headers.get("origin")
        if origin is not None:
            default = 443 if headers.get("x-forwarded-proto") == "https" else 80
            name, port = _origin_netloc(origin)
            host_name, host_port = _hostname(host), urlsplit("//" + host).port or default
            if origin == "null" or (name, port) != (host_name, host_port):
                return "cross-origin request"
        if headers.get("sec-fetch-site") == "cross-site":
            return "cross-site request"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.datastructures import Headers
        from starlette.responses import PlainTextResponse

        if scope["type"] in ("http", "websocket"):
            reason = self.refusal(Headers(scope=scope))
            if reason is not None:
                log.warning("refused %s %s: %s", scope.get("method", "WS"), scope.get("path"), reason)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await PlainTextResponse(f"forbidden: {reason}", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def launch(jobs: WebJobs, *, host: str = "127.0.0.1", port: int | None = 7860, workers: int = 1,
           max_upload_mb: float = MAX_UPLOAD_MB, allowed_hosts: frozenset[str] | None = LOCAL_HOSTS,
           queue_size: int = 64, block: bool = True) -> Any:
    """Serve the UI; ``block=False`` returns the running ``gr.Blocks`` (``.close()`` stops it; tests)."""
    from starlette.middleware import Middleware

    from appleswap.app.web_ui import CSS, build_ui

    demo = build_ui(jobs, workers=workers)
    demo.queue(max_size=queue_size, default_concurrency_limit=workers)
    demo.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 1024 * 1024),
                app_kwargs={"middleware": [Middleware(SameOriginGuard, allowed_hosts=allowed_hosts)]},
                ssr_mode=False, quiet=True, show_error=False, prevent_thread_lock=not block,
                footer_links=["api"], allowed_paths=[str(jobs.work_dir)], css=CSS)
    return demo


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app", parents=[common_parser()], help="web UI: upload photos or a video, pick a face, swap, download",
        description=__doc__, formatter_class=HelpFormatter,
        epilog="example:\n  appleswap app --weights-dir ~/weights   # then open http://127.0.0.1:7860")
    parser.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                        help="serve on ADDRESS (default 0.0.0.0: every network interface) instead of 127.0.0.1; "
                             "anyone who can reach it can use the UI")
    parser.add_argument("--host", dest="listen", help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                        help="with --listen: a host name the page is opened under (repeat; default: any)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1,
                        help="swap jobs run at once (the models run one at a time; the rest overlaps)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest upload accepted")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest photo or video frame, in pixels")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the temp dir of uploads and results (removed on exit; default: the system temp dir)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from appleswap.app.swapper import SwapConfig, swap_section
    from appleswap.config import load_config_file, resolve_config

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    defaults = resolve_config(SwapConfig, None, swap_section(load_config_file(args.config)))
    host = args.listen or "127.0.0.1"
    allowed = LOCAL_HOSTS
    if host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this address can use the UI and the GPU", host)
        allowed = frozenset(h.lower() for h in args.allowed_host) | LOCAL_HOSTS if args.allowed_host else None
    with tempfile.TemporaryDirectory(prefix="appleswap-app-", dir=args.work_dir) as work:
        os.environ["GRADIO_TEMP_DIR"] = str(Path(work) / "uploads")  # uploads go where the exit removes them
        jobs = WebJobs(engine_cache(args.weights_dir, args.device), Path(work) / "jobs", defaults,
                       max_pixels=args.max_pixels)
        print(f"appleswap app: open http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{args.port}"
              "  (Ctrl+C to stop)")
        launch(jobs, host=host, port=args.port, workers=args.workers, max_upload_mb=args.max_upload_mb,
               allowed_hosts=allowed)
    return 0
