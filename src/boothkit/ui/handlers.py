"""What the UI's buttons and timers do: each checks its form through the CLI's config and calls the CLI's function."""
from __future__ import annotations

import functools
import html
import io
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core import config as C
from ..core.errors import BoothkitError, ConfigError
from ..core.files import atomic_folder, atomic_write_bytes
from ..evaluate.metrics import DEFAULT_CLIP, DEFAULT_DINO, EVALUATE_SECTIONS, run_evaluate
from ..evaluate.sweep import SWEEP_SECTIONS, cells_of, load_prompts, run_sweep
from ..export.formats import EXPORT_SECTIONS
from ..export.formats import export as run_export
from ..models.mini_flow import EMOJI_MODELS
from . import runs as R
from .forms import resolve_form, user_errors

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

UPLOAD_DIR = "instance_photos"  # uploaded photos are copied here, under the run folder


# ------------------------------------------------------------------------------------------- photos

def copy_photos(photos: list[str], folder: Path, check: Callable[[Path], Any] | None = None) -> Path:
    """Uploaded files -> `folder` (the training reads a folder), replacing an earlier upload only once the new one
    is complete and `check(folder)` (given the new photos' folder) has passed: a refused or interrupted upload
    leaves the earlier photos as they were (core.files.atomic_folder).

    Each readable photo is stored as the upright RGB PNG training sees, without its EXIF (phone photos carry GPS
    positions, and a run folder gets shared); an unreadable one is copied as it is, so that training names it."""
    with atomic_folder(folder) as new:
        _store_photos(photos, new)
        if check is not None:
            try:
                check(new)
            except BoothkitError as exc:  # named as the folder they are about to be, not the temp one
                raise type(exc)(str(exc).replace(str(new), str(folder))) from None
    return folder


def _store_photos(photos: list[str], folder: Path) -> None:
    from ..train.data import load_image

    for i, p in enumerate(photos):
        try:
            img = load_image(p)
        except BoothkitError:
            shutil.copy(p, folder / f"{i:03d}-{Path(p).name}")
            continue
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # lossless: the pixels training reads are the decoded upload's
        atomic_write_bytes(folder / f"{i:03d}-{Path(p).stem}.png", buf.getvalue())


def inspect_photos(photos: list[str] | None) -> tuple[list[tuple[Any, str]], str]:
    """Thumbnails of the readable uploads, upright as training sees them, and one line per file that is not."""
    from ..train.data import FEW_PHOTOS, MANY_PHOTOS, TINY_SIDE, load_image

    thumbs, notes = [], []
    for p in photos or []:
        name = Path(p).name
        try:
            img = load_image(p)  # EXIF orientation applied: a phone's portrait shows upright
        except BoothkitError as exc:
            notes.append(f"- **{name}**: {str(exc).replace(str(p), '').lstrip(': ')}")
            continue
        if min(img.size) < TINY_SIDE:
            notes.append(f"- **{name}**: only {img.width}x{img.height} pixels; it will look blurry")
        img.thumbnail((192, 192))
        thumbs.append((img, name))
    if photos and not FEW_PHOTOS <= len(thumbs) <= MANY_PHOTOS:
        notes.append(f"- {len(thumbs)} readable photos; DreamBooth works best with {FEW_PHOTOS}-5")
    return thumbs, "\n".join(notes)


# --------------------------------------------------------------------------------------------- train

def train_config(values: Mapping[str, Any], output_dir: str | Path) -> C.RunConfig:
    """The train form (plus uploaded 'photos', which go to OUTPUT/instance_photos) -> the CLI's RunConfig."""
    values = {k: v for k, v in values.items() if k not in ("run_name", "preset")}
    values["output_dir"] = str(output_dir)
    if values.pop("photos", None):
        values["instance_dir"] = str(Path(output_dir) / UPLOAD_DIR)
    return C.validate_train(resolve_form(C.TRAIN_SECTIONS, values))


def start_training(queue: R.RunQueue, values: Mapping[str, Any]) -> tuple[str, str]:
    """Train button: checks the form and the photos now (one-line errors), then queues the run -> (name, message)."""
    from ..train.data import load_folder

    with user_errors():
        name = str(values.get("run_name") or "").strip() or queue.new_name(str(values.get("token") or ""),
                                                                           str(values.get("class_noun") or ""))
        folder = queue.folder(name)
        cfg = train_config(values, folder)
        queue.check_idle(name)
        if folder.exists() and not cfg.train.overwrite:
            raise ConfigError(f"run name {name}: a run of that name exists; choose another name or tick overwrite")
        created = not folder.exists()
        try:
            check = functools.partial(load_folder, skip_bad=cfg.data.skip_bad_images)  # a bad photo is named now
            if values.get("photos"):
                copy_photos(values["photos"], Path(cfg.data.instance_dir), check)
            else:
                check(cfg.data.instance_dir)
            return name, queue.submit(cfg, name)  # an earlier run's log and pictures go when this one starts
        except BoothkitError:
            if created:  # a refused run leaves no folder behind
                shutil.rmtree(folder, ignore_errors=True)
            raise


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(p: R.Progress | None) -> str:
    """The run's bar: state, step of total, pace and ETA (data-* attributes carry the numbers for scripts)."""
    if p is None:
        return '<div id="bk-status" data-state="none">No runs yet: add photos and press Train.</div>'
    parts = [p.state]
    if p.total:
        parts.append(f"step {p.step}/{p.total}")
    if p.seconds_per_step:
        parts.append(f"{p.seconds_per_step:.2f} s/step")
    if p.state == "running" and p.eta is not None:
        parts.append(f"ETA {_clock(p.eta)}")
    text = " · ".join(parts) + (f" — {p.message}" if p.message else "")
    colour = {"failed": "#c0392b", "cancelled": "#b9770e", "stopped": "#b9770e", "done": "#1e8449"}.get(p.state, "inherit")
    return (f'<div id="bk-status" data-state="{p.state}" data-step="{p.step}" data-total="{p.total}">'
            f'<progress value="{p.step}" max="{max(p.total, 1)}" style="width:100%;height:1.2em"></progress>'
            f'<div style="color:{colour}">{html.escape(text)}</div></div>')


LOSS_COLOURS = {"total": "#1f77b4", "subject": "#ff7f0e", "prior": "#2ca02c"}


def loss_frame(rows: list[dict[str, float]], prior: bool):
    """train_log.csv rows -> the long table gr.LinePlot draws: total, subject and (with prior) prior loss by step.

    It starts with one empty row per curve: the page's plot takes its colours' names from the first table it
    draws and keeps them, so every name must be in every table, even before the first step (empty rows draw
    nothing)."""
    import pandas as pd

    curves = {"total": "loss", "subject": "instance_loss"} | ({"prior": "prior_loss"} if prior else {})
    data = [(None, None, curve) for curve in LOSS_COLOURS]
    data += [(r["step"], r[col], curve) for r in rows for curve, col in curves.items() if col in r]
    return pd.DataFrame(data, columns=["step", "loss", "curve"]).astype({"step": "float64", "loss": "float64"})


def run_view(queue: R.RunQueue, name: str | None) -> dict[str, Any]:
    """Everything the run panel shows, read from the run folder (so a reload shows the same)."""
    if not name:
        return {"status": progress_html(None), "loss": loss_frame([], False), "validation": [], "log": "",
                "config": "", "weights": None, "cancel": False, "resume": False}
    folder, p = queue.folder(name), queue.progress(name)
    prior = R.run_settings(folder).get("prior", {}).get("prior", C.PriorConfig.prior)
    config = next((f for f in (folder / "config.toml", folder / R.REQUEST) if f.is_file()), None)
    weights = R.weights(folder)
    earlier = queue.hides_earlier(name)  # a fresh run still queued: what the folder shows is an earlier attempt's
    log_file = folder / R.LOG
    return {"status": progress_html(p), "loss": loss_frame([] if earlier else R.read_log(folder), prior),
            "validation": [] if earlier else [(str(g), f"step {s}") for g, s in R.validation_grids(folder)],
            "log": log_file.read_text(errors="replace") if log_file.is_file() and not earlier else "",
            "config": config.read_text() if config else "",
            "weights": str(weights) if weights is not None and weights.is_file() else None,
            "cancel": p.state in R.ACTIVE,
            "resume": p.state in ("cancelled", "failed", "stopped") and weights is None}


def run_choices(queue: R.RunQueue, finished: bool = False) -> list[tuple[str, str]]:
    """(label, name) of the runs, newest first; `finished`: only those with weights to generate from."""
    return [(f"{n} ({s.get('state')})", n) for n, s in queue.runs()
            if not finished or R.weights(queue.folder(n)) is not None]


# ------------------------------------------------------------------------------------ generate, sweep, report

UNCHANGED = object()  # what a stream yields when nothing changed (the page keeps what it shows: gr.skip())


def _streamed(work: Callable[[threading.Event], Any], poll: Callable[[], Any], interval: float = 0.5):
    """Run work(stop) in a thread, yielding poll() when it changes and UNCHANGED otherwise, every `interval` (a
    generator gradio can close must come back to a yield often); returns work()'s result or raises its error.
    Closed early (the page's Stop: gradio closes the generator), it sets `stop`; the work ends at its next check
    (between pictures or cells), with what it wrote whole. Not waited for: gradio closes on its event loop."""
    box: dict[str, Any] = {}
    stop = threading.Event()

    def target() -> None:
        try:
            box["result"] = work(stop)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="boothkit-stream", daemon=True)
    thread.start()
    last = None
    try:
        while thread.join(interval) or thread.is_alive():
            now = poll()
            yield now if now != last else UNCHANGED
            last = now
    finally:
        stop.set()  # a no-op once the work has ended
    if "error" in box:
        raise box["error"]
    return box["result"]


def _finished_run(queue: R.RunQueue, name: str | None) -> Path:
    if not name:
        raise ConfigError("run: pick a finished run")
    folder = queue.folder(name)
    if R.weights(folder) is None:
        raise ConfigError(f"run {name}: no weights yet ({queue.status(name).get('state')})")
    return folder


def _next_folder(parent: Path) -> Path:
    """parent/001, parent/002, ...: each generation, sweep or report keeps its own folder."""
    taken = [int(p.name) for p in parent.glob("[0-9][0-9][0-9]") if p.is_dir()]
    return parent / f"{max(taken, default=0) + 1:03d}"


def run_defaults(queue: R.RunQueue, name: str | None) -> dict[str, Any]:
    """What picking a run fills in: its instance prompt (with the identifier) and, for built-in models, evaluators."""
    if not name:
        return {}
    with user_errors():
        cfg = R.run_config(queue.folder(name))

    model = cfg.model.model
    # the built-in models have their own offline evaluators (mini's judge mini-flow too: the same world)
    own = "mini" if model in EMOJI_MODELS else "tiny" if model == "tiny" else None
    return {"prompt": cfg.data.prompt, "clip_model": own or DEFAULT_CLIP, "dino_model": own or DEFAULT_DINO}


def generate(queue: R.RunQueue, name: str | None, values: Mapping[str, Any], progress=None):
    """Generate button: streams the gallery as PNGs are written; ends with (gallery, files to download)."""
    from ..generate.generation import run_generate

    with user_errors():
        folder = _finished_run(queue, name)
        out = _next_folder(folder / "samples")
        cfg = resolve_form(C.GENERATE_SECTIONS, {**values, "lora": str(folder), "out": str(out)})
        total = len(cfg.generate.prompt) * cfg.generate.num_images

        def poll():
            done = sorted(out.glob("[0-9][0-9][0-9]-*.png"))
            if progress is not None:
                progress((len(done), total), desc="generating")
            return [(str(p), p.stem) for p in done], None

        written = yield from _streamed(lambda stop: run_generate(cfg, stop), poll)
    yield [(str(p), p.stem) for p in written], [str(p) for p in written]


def sweep(queue: R.RunQueue, name: str | None, values: Mapping[str, Any], progress=None):
    """Sweep button: `boothkit sweep` into RUN/sweeps/NNN; ends with the contact sheets (and metrics plot)."""
    with user_errors():
        folder = _finished_run(queue, name)
        out = _next_folder(folder / "sweeps")
        cfg = resolve_form(SWEEP_SECTIONS, {**values, "lora": str(folder), "out": str(out)})
        total = len(cells_of(load_prompts(cfg.sweep), cfg.sweep.axes())) * cfg.sweep.num_images

        def poll():
            if progress is not None:
                progress((len(list(out.glob("cells/*/*/*.png"))), total), desc="sweeping")
            return None

        yield from _streamed(lambda stop: run_sweep(cfg, stop), poll)
    shown = sorted(out.glob("sheet-*.png")) + sorted(out.glob("metrics.png"))
    yield [(str(p), p.stem) for p in shown]


def sample_choices(queue: R.RunQueue, name: str | None) -> list[str]:
    """The run's generation folders (RUN/samples/NNN), newest first."""
    if not name:
        return []
    return sorted((p.name for p in (queue.folder(name) / "samples").glob("[0-9][0-9][0-9]") if p.is_dir()), reverse=True)


def report_html(path: Path | None) -> str:
    """An evaluation report in a frame (it is a whole page with its own styles and inline pictures)."""
    if path is None or not path.is_file():
        return '<p id="bk-report-none">No report for these samples yet: press Evaluate.</p>'
    return (f'<iframe id="bk-report" title="evaluation report" srcdoc="{html.escape(path.read_text())}" '
            'style="width:100%;height:720px;border:1px solid #ddd"></iframe>')


def evaluate(queue: R.RunQueue, name: str | None, samples: str | None, class_samples: str | None,
             values: Mapping[str, Any]):
    """Evaluate button: `boothkit evaluate` of RUN/samples/NNN against the run's photos; streams UNCHANGED while
    it works (so Stop can close it), then ends with (report frame, file)."""
    with user_errors():
        folder = _finished_run(queue, name)
        if not samples:
            raise ConfigError("evaluate.samples: generate pictures first, then pick them")
        cfg = resolve_form(EVALUATE_SECTIONS, {
            **values, "samples": str(folder / "samples" / samples), "out": str(folder / "reports" / samples),
            "real_dir": R.run_config(folder).data.instance_dir,
            "class_samples": str(folder / "samples" / class_samples) if class_samples else ""})
        report = yield from _streamed(lambda stop: run_evaluate(cfg, stop), lambda: None)
    yield report_html(report), str(report)


def export(values: Mapping[str, Any]) -> str:
    """Export handler: the written file or folder."""
    with user_errors():
        return str(run_export(resolve_form(EXPORT_SECTIONS, values).export))
