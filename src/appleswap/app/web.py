"""``appleswap app``: a small web UI (standard library HTTP server, served on 127.0.0.1 by default).

Why not Gradio: its current releases pin pillow < 13, which conflicts with this project's pins; a page with one
form and three JSON endpoints needs no framework. Upload source photo(s) and a target (photo or video), look at
the numbered faces, adjust the knobs, swap, preview and download. Every result is labelled and watermarked like
the CLI's; bad input shows a message on the page instead of a crash.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import logging
import re
import tempfile
import threading
import uuid
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from appleswap.cli_common import HelpFormatter, common_parser

log = logging.getLogger(__name__)
MAX_UPLOAD = 512 * 1024 * 1024
FORM_FIELDS = {"model": str, "face_selector": str, "face_selector_order": str, "face_position": int,
               "reference_face_distance": float, "steps": int, "seed": int, "id_guidance_scale": float}


CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".mp4": "video/mp4"}


class UserError(ValueError):
    """Shown to the user as is (bad upload, no face, ...)."""


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, list[tuple[str, bytes]]]]:
    """(fields, files) of a multipart/form-data body; files map a field to [(filename, bytes), ...]."""
    if not content_type.startswith("multipart/form-data"):
        raise UserError("expected a multipart/form-data upload")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, list[tuple[str, bytes]]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True) or b""
        if filename is not None:
            if data:
                files.setdefault(name, []).append((filename, data))
        elif name:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "upload"
    return name[-80:]


class WebApp:
    """Request logic, independent of HTTP: uploads in, result files out, under ``work_dir``."""

    def __init__(self, engine_for: Callable[[Any], Any], work_dir: Path, defaults: Any) -> None:
        self.engine_for = engine_for  # SwapConfig -> SwapEngine (loads and caches models)
        self.work_dir = Path(work_dir)
        self.defaults = defaults
        self.lock = threading.Lock()  # one model run at a time

    def _config(self, fields: dict[str, str]) -> Any:
        values: dict[str, Any] = {}
        for key, kind in FORM_FIELDS.items():
            if fields.get(key, "") != "":
                try:
                    values[key] = kind(fields[key])
                except ValueError as error:
                    raise UserError(f"{key.replace('_', ' ')}: {fields[key]!r} is not a valid {kind.__name__}") from error
        values["watermark"] = fields.get("watermark", "on") == "on"
        try:
            return dataclasses.replace(self.defaults, **values).check()
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from error

    def _store(self, job: Path, files: list[tuple[str, bytes]], prefix: str) -> list[Path]:
        paths = []
        for index, (name, data) in enumerate(files):
            path = job / f"{prefix}{index}_{_safe_name(name)}"
            path.write_bytes(data)
            paths.append(path)
        return paths

    def faces(self, files: dict[str, list[tuple[str, bytes]]], fields: dict[str, str]) -> dict[str, Any]:
        """Numbered faces of the target photo in the chosen order, as a preview picture."""
        import cv2
        import numpy as np
        from PIL import Image

        from appleswap.app.selection import order_faces
        from appleswap.faces.detect import detect_faces
        from appleswap.files import ImageLoadError, load_image

        if not files.get("target"):
            raise UserError("choose a target photo first")
        job = self._job()
        target = self._store(job, files["target"][:1], "target")[0]
        try:
            image = load_image(target)
        except ImageLoadError as error:
            raise UserError(f"target: {error}") from error
        faces = detect_faces(image)
        order = order_faces(faces, fields.get("face_selector_order") or self.defaults.face_selector_order)
        canvas = np.ascontiguousarray(image)
        thickness = max(2, image.shape[1] // 300)
        for rank, index in enumerate(order):
            x0, y0, x1, y1 = faces[index].box.astype(int)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 255, 0), thickness)
            cv2.putText(canvas, str(rank), (x0, max(y0 - 8, 20)), cv2.FONT_HERSHEY_SIMPLEX, thickness / 2,
                        (0, 255, 0), thickness)
        buffer = io.BytesIO()
        preview = Image.fromarray(canvas)
        preview.thumbnail((768, 768))
        preview.save(buffer, format="JPEG", quality=85)
        return {"ok": True, "count": len(faces), "preview": "data:image/jpeg;base64,"
                + base64.b64encode(buffer.getvalue()).decode(), "boxes": [faces[i].box.round().tolist() for i in order]}

    def swap(self, files: dict[str, list[tuple[str, bytes]]], fields: dict[str, str]) -> dict[str, Any]:
        from appleswap.app.naming import output_name
        from appleswap.app.video import is_video_path
        from appleswap.files import ImageLoadError, is_image_path

        if not files.get("source"):
            raise UserError("choose at least one source photo (the face to put in)")
        if not files.get("target"):
            raise UserError("choose a target photo or video (where the face goes)")
        config = self._config(fields)
        job = self._job()
        sources = self._store(job, files["source"], "source")
        target = self._store(job, files["target"][:1], "target")[0]
        reference = self._store(job, files.get("reference", [])[:1], "reference")
        video = is_video_path(target)
        if not video and not is_image_path(target):
            raise UserError(f"target: {files['target'][0][0]!r} is neither a photo nor a video we can read")
        name = output_name(config.output_pattern, files["source"][0][0], files["target"][0][0], video=video)
        output = job / _safe_name(name)
        with self.lock:
            engine = self.engine_for(config)
            try:
                if config.face_selector == "reference":
                    if not reference:
                        raise UserError("face selector 'reference' needs a reference photo")
                    engine.set_reference(reference[0])
                identity = engine.source_identity(sources)
                if video:
                    result = engine.swap_video_file(identity, sources, target, output, progress=False)
                else:
                    result = engine.swap_image_file(identity, sources, target, output)
            except (ImageLoadError, ValueError, FileNotFoundError) as error:
                raise UserError(str(error).replace(str(job) + "/", "")) from error
        url = f"/files/{job.name}/{output.name}"
        return {"ok": True, "output": url, "download": url + "?download=1", "video": video, "name": output.name,
                "faces": len(result.get("faces", [])), "message": f"done: {output.name} (labelled AI-generated)"}

    def post(self, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON reply) for a POST; every failure becomes a message for the page."""
        try:
            fields, files = parse_multipart(content_type, body)
            if path == "/api/swap":
                return HTTPStatus.OK, self.swap(files, fields)
            if path == "/api/faces":
                return HTTPStatus.OK, self.faces(files, fields)
            return HTTPStatus.NOT_FOUND, {"ok": False, "error": "not found"}
        except UserError as error:
            return HTTPStatus.BAD_REQUEST, {"ok": False, "error": str(error)}
        except FileNotFoundError as error:  # missing weights: the message says which file and where
            return HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "error": str(error)}
        except Exception as error:  # the page must show something; the server lives on
            log.exception("request %s failed", path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"ok": False,
                                                      "error": f"internal error: {type(error).__name__}: {error}"}

    def _job(self) -> Path:
        job = self.work_dir / uuid.uuid4().hex
        job.mkdir(parents=True)
        return job

    def file(self, job: str, name: str) -> Path | None:
        if not re.fullmatch(r"[0-9a-f]{32}", job) or _safe_name(name) != name:
            return None
        path = self.work_dir / job / name
        return path if path.is_file() else None


def _handler(app: WebApp) -> type[BaseHTTPRequestHandler]:
    page = resources.files("appleswap.app").joinpath("static", "index.html").read_text()

    class Handler(BaseHTTPRequestHandler):
        server_version = "appleswap"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            match = re.fullmatch(r"/files/([^/]+)/([^/]+)", path)
            found = app.file(*match.groups()) if match else None
            if found is None:
                return self._json(HTTPStatus.NOT_FOUND, {"ok": False, "error": "not found"})
            kind = CONTENT_TYPES.get(found.suffix.lower(), "application/octet-stream")
            extra = {"Content-Disposition": f'attachment; filename="{found.name}"'} if "download=1" in query else {}
            self._send(HTTPStatus.OK, found.read_bytes(), kind, extra)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD:
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"ok": False, "error": "upload too large"})
            status, data = app.post(self.path, self.headers.get("Content-Type", ""), self.rfile.read(length))
            return self._json(status, data)

    return Handler


def engine_cache(weights_dir: str | None, device: str | None) -> Callable[[Any], Any]:
    """SwapConfig -> SwapEngine, loading each model kind (student / teacher) once."""
    from appleswap.app.engine import SwapEngine

    engines: dict[str, Any] = {}

    def get(config: Any) -> Any:
        if config.model not in engines:
            engines[config.model] = SwapEngine.load(dataclasses.replace(config, face_selector="one"), weights_dir,
                                                    device)
        return engines[config.model].with_config(config)

    return get


def make_server(app: WebApp, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the UI", host)
    return ThreadingHTTPServer((host, port), _handler(app))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app", parents=[common_parser()], help="web UI: upload photos or a video, swap, preview, download",
        description=__doc__, formatter_class=HelpFormatter,
        epilog="example:\n  appleswap app --weights-dir ~/weights   # then open http://127.0.0.1:7860")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (keep 127.0.0.1 unless you know)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (0 = any free port)")
    parser.add_argument("--work-dir", default=None, help="where uploads and results are kept (default: a temp dir)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from appleswap.app.swapper import SwapConfig, swap_section
    from appleswap.config import load_config_file, resolve_config

    defaults = resolve_config(SwapConfig, None, swap_section(load_config_file(args.config)))
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="appleswap-app-"))
    app = WebApp(engine_cache(args.weights_dir, args.device), work_dir, defaults)
    server = make_server(app, args.host, args.port)
    print(f"appleswap app: open http://{args.host}:{server.server_address[1]}  (Ctrl+C to stop; files in {work_dir})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
