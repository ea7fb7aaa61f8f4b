"""`boothkit ui`: a Gradio front end (train, generate, export) over the same functions the CLI calls.

Every form field is made from a config dataclass field (type, choices, default, help text), and the form
values go through ``config.resolve`` exactly like CLI flags, so the UI cannot drift from the CLI and holds
no logic of its own. gradio is imported inside functions: it is an optional extra (``boothkit[ui]``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import config as C
from .errors import BoothkitError

UPLOAD_DIR = "instance_photos"  # uploaded photos are copied here, under the output folder
TRAIN_MAIN = ("instance_dir", "token", "class_noun", "instance_prompt", "model", "prior", "num_class_images", "rank",
              "max_steps", "learning_rate", "text_encoder_lr", "train_text_encoder", "output_dir")
GENERATE_MAIN = ("lora", "prompt", "negative_prompt", "num_images", "guidance", "unet_scale", "text_encoder_scale",
                 "steps", "seed", "scheduler", "out")
EXPORT_MAIN = ("format", "lora", "out")


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise BoothkitError("the UI needs gradio: pip install 'boothkit[ui]'") from None
    return gr


# ------------------------------------------------------------------------------------ fields <-> forms

def _fields(sections: Mapping[str, type]) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Field name -> (dataclass field, type hint) over all sections (names are unique per command)."""
    out = {}
    for cls in sections.values():
        hints = typing.get_type_hints(cls)
        out.update({f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)})
    return out


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)][0], True
    return tp, False


def form_value(field: dataclasses.Field, tp: Any) -> Any:
    """What the form shows for a field's default (tuples one item per line, None as empty text)."""
    tp, _ = _unwrap(tp)
    if typing.get_origin(tp) is tuple:
        return "\n".join(field.default)
    return "" if field.default is None else field.default


def form_defaults(sections: Mapping[str, type]) -> dict[str, Any]:
    """Every field's form value at its dataclass default."""
    return {name: form_value(f, tp) for name, (f, tp) in _fields(sections).items()}


def config_value(tp: Any, value: Any) -> Any:
    """A form value -> the value a TOML file or CLI flag would give (config.resolve validates it)."""
    tp, optional = _unwrap(tp)
    if typing.get_origin(tp) is tuple:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if optional and value in ("", None):
        return None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # gr.Number may hand back 2.0 for 2
    return value


def resolve_form(sections: Mapping[str, type], values: Mapping[str, Any]) -> C.RunConfig:
    """Form values -> RunConfig through config.resolve, the CLI's validation (errors name section.key)."""
    fields = _fields(sections)
    overrides = {name: config_value(fields[name][1], v) if name in fields else v for name, v in values.items()}
    return C.resolve(sections, {}, overrides)


def _component(gr, field: dataclasses.Field, tp: Any):
    """A gradio input for one config field: widget by type and choices, default and help from the dataclass."""
    base, optional = _unwrap(tp)
    kw = dict(label=field.name.replace("_", " "), info=field.metadata.get("help"), value=form_value(field, tp))
    choices = field.metadata.get("choices")
    if choices:
        opts = ([("(default)", "")] if optional else []) + [(str(c), c) for c in choices]
        return gr.Dropdown(choices=opts, **kw)
    if typing.get_origin(base) is tuple:
        kw["info"] = f"{kw['info']} One per line."
        return gr.Textbox(lines=2, **kw)
    if base is bool:
        return gr.Checkbox(**kw)
    if base in (int, float):
        return gr.Number(precision=0 if base is int else None, **kw)
    return gr.Textbox(**kw)


def _form(gr, sections: Mapping[str, type], main: tuple[str, ...]) -> dict[str, Any]:
    """Components for the `main` fields, then an Advanced accordion with every other field."""
    fields = _fields(sections)
    comps = {name: _component(gr, *fields[name]) for name in main}
    with gr.Accordion("Advanced", open=False):
        comps.update({name: _component(gr, f, tp) for name, (f, tp) in fields.items() if name not in comps})
    return comps


# ------------------------------------------------------------------------------------------- running

@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A BoothkitError (bad key, value, file) shows as a one-line gr.Error, never a traceback."""
    try:
        yield
    except BoothkitError as exc:
        raise _gradio().Error(str(exc), print_exception=False) from None


class _Lines(logging.Handler):
    """Collects boothkit's log messages (e.g. a token that splits) to show under the form."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _stream(work: Callable[[], Any], poll: Callable[[], Any], interval: float = 0.5):
    """Run work() in a thread, yielding poll() whenever it changes; returns work()'s result or raises its error."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    last = None
    while thread.join(interval) or thread.is_alive():
        if (now := poll()) != last:
            yield now
        last = now
    if "error" in box:
        raise box["error"]
    return box["result"]


MAX_UPLOAD = "50mb"  # per file: a 50-megapixel phone JPEG is ~25 MB


def copy_photos(photos: list[str], folder: Path) -> Path:
    """Uploaded files -> a fresh folder (the training reads a folder); replaces an earlier upload.

    Each readable photo is stored as the upright RGB PNG training sees, without its EXIF (phone photos carry GPS
    positions, and a run folder gets shared); an unreadable one is copied as it is, so that training names it."""
    from .data import load_image
    from .files import atomic_write_bytes

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, p in enumerate(photos):
        try:
            img = load_image(p)
        except BoothkitError:
            shutil.copy(p, folder / f"{i:03d}-{Path(p).name}")
            continue
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # lossless: the pixels training reads are the decoded upload's
        atomic_write_bytes(folder / f"{i:03d}-{Path(p).stem}.png", buf.getvalue())
    return folder


def train_config(values: Mapping[str, Any]) -> C.RunConfig:
    """The train form (plus uploaded 'photos', which become OUTPUT/instance_photos) -> the CLI's RunConfig."""
    values = dict(values)
    photos = values.pop("photos", None) or []
    if photos:
        values["instance_dir"] = str(Path(str(values.get("output_dir") or "")) / UPLOAD_DIR)
    return C.validate_train(resolve_form(C.TRAIN_SECTIONS, values))


def _train_status(cfg: C.RunConfig, start: float, lines: _Lines, progress) -> str:
    out, total = Path(cfg.train.output_dir), cfg.train.max_steps
    log_csv = out / "train_log.csv"
    text = "loading the model, photos and class images..."
    if log_csv.is_file() and log_csv.stat().st_mtime >= start:
        rows = log_csv.read_text().strip().splitlines()
        if len(rows) > 1:
            step, loss = rows[-1].split(",")[:2]
            text = f"step {step}/{total}  loss {float(loss):.4f}  ({time.time() - start:.0f} s)"
            if progress is not None:  # gradio's bar shows the ETA
                progress((int(step), total), desc="training")
    return "\n".join(lines.lines + [text])


def train(values: Mapping[str, Any], progress=None):
    """Train handler: streams status text; ends with (status, validation grid or None, LoRA/model path)."""
    from .lora import LORA_FILE
    from .train import run_training

    with user_errors():
        cfg = train_config(values)
        photos = values.get("photos") or []
        if photos:
            copy_photos(photos, Path(cfg.data.instance_dir))
        lines, start = _Lines(), time.time()
        logging.getLogger("boothkit").addHandler(lines)
        try:
            for status in _stream(lambda: run_training(cfg), lambda: _train_status(cfg, start, lines, progress)):
                yield status, None, ""
            out = Path(cfg.train.output_dir)
        finally:
            logging.getLogger("boothkit").removeHandler(lines)
    grids = sorted(out.glob("validation/step-*/grid.png"))
    result = out / "model" if cfg.lora.full else out / LORA_FILE
    done = f"done: {cfg.train.max_steps} steps in {time.time() - start:.0f} s"
    yield "\n".join(lines.lines + [done]), str(grids[-1]) if grids else None, str(result)


def generate(values: Mapping[str, Any], progress=None):
    """Generate handler: streams the gallery of PNGs written so far; ends with every written PNG."""
    from .generate import run_generate

    with user_errors():
        cfg = resolve_form(C.GENERATE_SECTIONS, values)
        g, start = cfg.generate, time.time()
        total = len(g.prompt) * g.num_images

        def poll() -> list[str]:
            done = [str(p) for p in sorted(Path(g.out).glob("[0-9][0-9][0-9]-*.png")) if p.stat().st_mtime >= start]
            if progress is not None:
                progress((len(done), total), desc="generating")
            return done

        written = yield from _stream(lambda: run_generate(cfg), poll)
    yield [str(p) for p in written]


def export(values: Mapping[str, Any]) -> str:
    """Export handler: the written file or folder."""
    from .export import EXPORT_SECTIONS, export as run_export

    with user_errors():
        return str(run_export(resolve_form(EXPORT_SECTIONS, values).export))


# ---------------------------------------------------------------------------------------------- layout

def _wire(gr, handler: Callable, comps: Mapping[str, Any]) -> Callable:
    """An event function taking the components as one dict (gradio's set-of-inputs form) and a progress bar."""
    names = {comp: name for name, comp in comps.items()}

    def fn(data, progress=gr.Progress()):
        yield from handler({names[c]: v for c, v in data.items()}, progress)

    return fn


def build_ui():
    """The Blocks app: Train, Generate and Export tabs."""
    gr = _gradio()
    from .export import EXPORT_SECTIONS

    with gr.Blocks(title="boothkit", analytics_enabled=False) as app:
        gr.Markdown("# boothkit\nDreamBooth LoRA for Stable Diffusion: the same options as `boothkit train`, "
                    "`generate` and `export`.")
        with gr.Tab("Train"), gr.Row():
            with gr.Column(scale=3):  # the form on the left, the run and its results beside it
                photos = gr.File(label="subject photos (3-20; or give instance dir)", file_count="multiple",
                                 file_types=["image"], type="filepath")
                comps = {"photos": photos, **_form(gr, C.TRAIN_SECTIONS, TRAIN_MAIN)}
            with gr.Column(scale=2):
                button = gr.Button("Train", variant="primary")
                status = gr.Textbox(label="status", lines=3, interactive=False)
                grid = gr.Image(label="validation grid", type="filepath", interactive=False)
                result = gr.Textbox(label="LoRA", interactive=False)
            button.click(_wire(gr, train, comps), inputs=set(comps.values()), outputs=[status, grid, result],
                         api_name="train")
        with gr.Tab("Generate"), gr.Row():
            with gr.Column(scale=2):
                comps = _form(gr, C.GENERATE_SECTIONS, GENERATE_MAIN)
            with gr.Column(scale=3):
                button = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(label="images", columns=4)
            button.click(_wire(gr, generate, comps), inputs=set(comps.values()), outputs=gallery,
                         api_name="generate")
        with gr.Tab("Export"), gr.Row():
            with gr.Column(scale=3):
                comps = _form(gr, EXPORT_SECTIONS, EXPORT_MAIN)
            with gr.Column(scale=2):
                button = gr.Button("Export", variant="primary")
                written = gr.Textbox(label="written", interactive=False)
            names = {comp: name for name, comp in comps.items()}
            button.click(lambda data: export({names[c]: v for c, v in data.items()}), inputs=set(comps.values()),
                         outputs=written, api_name="export")
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any):
    """Build and serve the UI (blocks until stopped unless prevent_thread_lock=True is passed)."""
    app = build_ui()
    # uploads are photos: anything larger is refused by the server before it is written anywhere
    kwargs.setdefault("max_file_size", MAX_UPLOAD)
    app.launch(server_name=host, server_port=port, share=share, **kwargs)
    return app
