"""The Gradio page of ``appleswap app`` (``web.py`` serves it): uploads with previews, the face gallery,
options, swap with progress and cancel, before/after slider or video player, download.

Gradio is imported at module level because it reads the handlers' ``gr.Request`` / ``gr.SelectData``
annotations; ``web.py`` imports this module only when the app starts, so other commands stay fast.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import gradio as gr

from appleswap.app.selection import ORDERS
from appleswap.app.swap import JobCancelled
from appleswap.app.swapper import FACE_MASKS
from appleswap.app.web_jobs import UserError, VideoOptions, WebJobs, scrub_paths

INTRO = """# appleswap
Swap only faces of people who agreed to it. Every result is labelled "AI-generated" in its metadata and carries an
invisible watermark (`appleswap verify FILE` finds it). The model weights (FLUX.1 [dev], antelopev2) are for
non-commercial use."""
log = logging.getLogger(__name__)
CSS = """
#faces .grid-container, #source-preview .grid-container {
  grid-template-columns: repeat(auto-fill, 112px) !important; grid-auto-rows: 112px !important; }
"""  # square face tiles of one size, however many faces there are
CACHE_SWEEP = (600, 3600)  # Gradio's uploads and served results: checked every 10 min, removed after an hour
TRACK_STEPS = gr.Progress(track_tqdm=True)  # the samplers' step bars show on the page


class RunningJobs:
    """The cancel flag of each browser session's running swap (the Cancel button sets it)."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            self._flags[session] = flag = threading.Event()
        return flag

    def current(self, session: str) -> threading.Event | None:
        with self._lock:
            return self._flags.get(session)

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]

    def cancel(self, session: str) -> bool:
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()
        return flag is not None


def _fail(error: Exception) -> gr.Error:
    """The message the page shows: no server paths, no traceback."""
    return gr.Error(scrub_paths(str(error)), print_exception=False)


class PageHandlers:
    """What the page's events call: previews, the face gallery, swap and cancel (one object per app)."""

    def __init__(self, jobs: WebJobs) -> None:
        self.jobs = jobs
        self.running = RunningJobs()

    def show_sources(self, files: list[str] | None):
        if not files:
            return []
        try:
            paths = self.jobs.check_sources(files)
        except UserError as error:
            raise _fail(error) from error
        return [(str(p), p.name) for p in paths if p.suffix.lower() != ".safetensors"]

    def show_target(self, path: str | None, order: str, start: float):
        if not path:
            return gr.update(value=None, visible=True), gr.update(value=None, visible=False), [], 0, ""
        try:
            target = self.jobs.check_target(path)
            crops = self.jobs.face_files(target, order, float(start or 0))
        except UserError as error:
            raise _fail(error) from error
        image = gr.update(value=None if target.video else str(target.path), visible=not target.video)
        video = gr.update(value=str(target.path) if target.video else None, visible=target.video)
        gallery = [(str(crop), f"#{i}") for i, crop in enumerate(crops)]
        note = (f"{len(crops)} face(s) found; face #0 is chosen, click another to change"
                if crops else "no face found in the target (in a video: at the start time)")
        return image, video, gallery, 0, note

    def show_faces(self, path: str | None, order: str, start: float):
        if not path:
            return [], 0, ""
        return self.show_target(path, order, start)[2:]

    @staticmethod
    def choose_face(event: gr.SelectData):
        return event.index, f"face #{event.index} chosen"

    def settings(self, model, selector, order, position, face_mask, mask_blur, size, steps, seed, id_scale,
                 watermark, start, end, quality, keep_audio) -> tuple[Any, VideoOptions]:
        """The page's option values as a swap config and video options (a bad value: a message on the page)."""
        try:
            config = self.jobs.config(model=model, face_selector=selector, face_selector_order=order,
                                      face_position=int(position or 0), face_mask=face_mask,
                                      face_mask_blur=float(mask_blur), size=int(size), steps=int(steps),
                                      seed=int(seed or 0), id_guidance_scale=float(id_scale),
                                      watermark=bool(watermark), keep_audio=bool(keep_audio))
            return config, VideoOptions(start=float(start or 0), end=float(end) if end else None,
                                        quality=int(quality))
        except (UserError, TypeError, ValueError) as error:
            raise _fail(error) from error

    def swap(self, sources, target, model, selector, order, position, face_mask, mask_blur, size, steps, seed,
             id_scale, watermark, start, end, quality, keep_audio, request: gr.Request, progress=TRACK_STEPS):
        """Swap the source face into the target; returns (before/after, video, download, message)."""

        def report(done: int, total: int | None, desc: str) -> None:
            if total:
                progress((done, total), desc=desc, unit="frames")
            else:
                progress(0.0, desc=desc)  # a stage (loading, encoding); the samplers' steps follow

        config, video = self.settings(model, selector, order, position, face_mask, mask_blur, size, steps, seed,
                                      id_scale, watermark, start, end, quality, keep_audio)
        session = request.session_hash or "api"
        flag = self.running.current(session) or self.running.start(session)  # the page's click made one
        try:
            result = self.jobs.swap(sources or [], target, config, video=video, report=report, cancelled=flag)
        except JobCancelled:
            return gr.update(value=None), gr.update(value=None), None, "cancelled"
        except (UserError, FileNotFoundError) as error:  # a missing weight: the message names the file only
            raise _fail(error) from error
        except Exception as error:  # the page says what broke; the log has the traceback
            log.exception("swap failed")
            raise _fail(RuntimeError(f"internal error ({type(error).__name__}): {error}")) from error
        finally:
            self.running.finish(session, flag)
        if result.video:
            return (gr.update(value=None, visible=False), gr.update(value=str(result.output), visible=True),
                    str(result.output), result.message)
        return (gr.update(value=(str(result.before), str(result.output)), visible=True),
                gr.update(value=None, visible=False), str(result.output), result.message)

    def queued(self, request: gr.Request):
        self.running.start(request.session_hash or "api")

    def cancel(self, request: gr.Request):
        stopped = self.running.cancel(request.session_hash or "api")
        return "cancelling: the job stops after the current frame" if stopped else "nothing to cancel"


def _inputs_panel() -> dict[str, Any]:
    """Uploads with previews, and the face gallery."""
    parts: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            parts["sources"] = gr.File(label="1. Source: photo(s) of one person, or a saved identity (.safetensors)",
                                       file_count="multiple", file_types=["image", ".safetensors"], type="filepath",
                                       elem_id="source")
            parts["source_preview"] = gr.Gallery(label="Source preview", height=170, allow_preview=False,
                                                 interactive=False, elem_id="source-preview")
        with gr.Column():
            parts["target"] = gr.File(label="2. Target: the photo or video to change", file_types=["image", "video"],
                                      type="filepath", elem_id="target")
            parts["target_image"] = gr.Image(label="Target preview", type="filepath", image_mode=None,
                                             interactive=False, height=260, elem_id="target-image")
            parts["target_video"] = gr.Video(label="Target preview", interactive=False, visible=False, height=260,
                                             elem_id="target-video")
    parts["faces"] = gr.Gallery(label="3. Faces in the target: click the one to replace", height=170,
                                allow_preview=False, interactive=False, elem_id="faces")
    parts["face_note"] = gr.Markdown(elem_id="face-note")
    return parts


def _options_panel(defaults: Any) -> dict[str, Any]:
    """The swap options, in the order :meth:`PageHandlers.settings` takes them."""
    parts: dict[str, Any] = {}
    with gr.Accordion("Options", open=False, elem_id="options"):
        with gr.Row():
            parts["model"] = gr.Radio(["student", "teacher"], value=defaults.model, label="Model", elem_id="model")
            parts["selector"] = gr.Radio(
                [("the chosen face", "one"), ("every face", "many")], label="Faces to swap",
                value=defaults.face_selector if defaults.face_selector != "reference" else "one")
            parts["order"] = gr.Dropdown(list(ORDERS), value=defaults.face_selector_order, label="Face order")
            parts["position"] = gr.Number(value=0, precision=0, minimum=0, label="Face number", elem_id="position")
        with gr.Row():
            parts["face_mask"] = gr.Radio(list(FACE_MASKS), value=defaults.face_mask, label="Mask")
            parts["mask_blur"] = gr.Slider(0.0, 0.3, value=defaults.face_mask_blur, step=0.01, label="Mask feather")
            parts["size"] = gr.Slider(64, 1024, value=defaults.size, step=16, label="Size (px)", elem_id="size")
            parts["steps"] = gr.Slider(1, 50, value=defaults.steps, step=1, label="Steps", elem_id="steps")
        with gr.Row():
            parts["seed"] = gr.Number(value=defaults.seed, precision=0, label="Seed")
            parts["id_scale"] = gr.Slider(0.5, 3.0, value=defaults.id_guidance_scale, step=0.05,
                                          label="Identity strength")
            parts["watermark"] = gr.Checkbox(value=defaults.watermark, label="Invisible watermark")
        with gr.Row():
            parts["start"] = gr.Number(value=0, minimum=0, label="Video: start (s)", elem_id="trim-start")
            parts["end"] = gr.Number(value=0, minimum=0, label="Video: end (s, 0 = to the end)", elem_id="trim-end")
            parts["quality"] = gr.Slider(12, 35, value=18, step=1,
                                         label="Video quality (CRF: lower = better, bigger)")
            parts["keep_audio"] = gr.Checkbox(value=defaults.keep_audio, label="Keep the audio")
    return parts


def _results_panel() -> dict[str, Any]:
    parts: dict[str, Any] = {}
    with gr.Row():
        parts["swap"] = gr.Button("Swap", variant="primary", elem_id="swap")
        parts["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel")
    parts["status"] = gr.Markdown(elem_id="status")
    parts["before_after"] = gr.ImageSlider(label="Before / after", type="filepath", image_mode=None, max_height=600,
                                           elem_id="before-after")
    parts["result_video"] = gr.Video(label="Result", interactive=False, visible=False, elem_id="result-video")
    parts["download"] = gr.File(label="Download the labelled result", interactive=False, elem_id="download")
    return parts


def build_ui(jobs: WebJobs, *, workers: int = 1) -> Any:
    """The page: uploads with previews, the face gallery, options, swap / cancel, before/after or video."""
    handlers = PageHandlers(jobs)
    with gr.Blocks(title="appleswap", analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(INTRO)
        page, options = _inputs_panel(), _options_panel(jobs.defaults)
        out = _results_panel()
        face_inputs = [page["target"], options["order"], options["start"]]
        face_outputs = [page["faces"], options["position"], page["face_note"]]
        page["sources"].change(handlers.show_sources, page["sources"], page["source_preview"],
                               api_name="preview_sources", concurrency_id="preview", concurrency_limit=4)
        page["target"].change(handlers.show_target, face_inputs, [page["target_image"], page["target_video"],
                                                                  *face_outputs],
                              api_name="faces", concurrency_id="preview", concurrency_limit=4)
        for changed in (options["order"], options["start"]):
            changed.change(handlers.show_faces, face_inputs, face_outputs, api_name=False, concurrency_id="preview")
        page["faces"].select(handlers.choose_face, None, [options["position"], page["face_note"]], api_name=False,
                             queue=False)
        # the click first makes the job's cancel flag (so Cancel also reaches a job still waiting in the queue),
        # then queues the job; a cancelled job returns quietly (Gradio's own `cancels=` marks outputs "Error")
        out["swap"].click(handlers.queued, None, None, queue=False, api_name=False).then(
            handlers.swap, [page["sources"], page["target"], *options.values()],
            [out["before_after"], out["result_video"], out["download"], out["status"]], api_name="swap",
            concurrency_id="swap", concurrency_limit=workers)
        out["cancel"].click(handlers.cancel, None, out["status"], api_name="cancel", queue=False)
    return demo
