"""The page: a Train tab that watches the selected run, a Generate tab (pictures, sweep, report) and Export.

The run panel is redrawn from the run folder by a 1-second gr.Timer; an output whose content has not changed
since the last tick is skipped (gr.skip), so a growing run sends only its new loss rows and pictures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ..core import config as C
from ..evaluate.metrics import EVALUATE_SECTIONS
from ..evaluate.sweep import SWEEP_SECTIONS
from ..export.formats import EXPORT_SECTIONS
from . import handlers as H
from . import runs as R
from .forms import (
    DEFAULT_PRESET,
    EVALUATE_BY_RUN,
    EXPORT_MAIN,
    GENERATE_BY_RUN,
    GENERATE_MAIN,
    PRESETS,
    SWEEP_MAIN,
    TRAIN_BY_RUN,
    TRAIN_MAIN,
    form_components,
    preset_values,
    require_gradio,
    user_errors,
)

MAX_UPLOAD = "50mb"  # per file: a 50-megapixel phone JPEG is ~25 MB
POLL_SECONDS = 1.0
PANEL = ("status", "loss", "validation", "log", "config", "weights", "cancel", "resume")


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _named(comps: Mapping[str, Any], data: Mapping[Any, Any]) -> dict[str, Any]:
    """gradio's set-of-inputs dict (component -> value) -> field name -> value."""
    return {name: data[comp] for name, comp in comps.items() if comp in data}


def _key(value: Any) -> Any:
    """What tells one tick's output from the last (a loss table by its length and last row)."""
    if hasattr(value, "iloc"):  # repr: the empty rows' NaN must equal itself
        return ("table", len(value), repr(tuple(value.iloc[-1])) if len(value) else None)
    return repr(value)


def _panel_updates(gr, queue: R.RunQueue, name: str | None, seen: dict | None):
    """The run panel, the run picker's choices and the new `seen`; outputs unchanged since `seen` are skipped."""
    view = H.run_view(queue, name)
    view["runs"] = H.run_choices(queue)
    seen = dict(seen or {})
    out = []
    for key in (*PANEL, "runs"):
        k = _key(view[key])
        if seen.get(key) == k:
            out.append(gr.skip())
            continue
        seen[key] = k
        value = view[key]
        if key in ("cancel", "resume"):
            out.append(gr.update(interactive=value))
        elif key == "runs":
            out.append(gr.update(choices=value))
        else:
            out.append(value)
    return (*out, seen)


def _train_tab(gr, queue: R.RunQueue) -> dict[str, Any]:
    """Photos, preset and form on the left; the selected run (progress, loss, pictures, log, config) on the right."""
    with gr.Row():
        with gr.Column(scale=3):
            preset = gr.Dropdown(choices=list(PRESETS), value=DEFAULT_PRESET, label="preset",
                                 info="Fills every field below except the subject.", elem_id="bk-preset")
            photos = gr.File(label="subject photos (3-20)", file_count="multiple", file_types=["image"],
                             type="filepath", elem_id="bk-photos")
            thumbs = gr.Gallery(label="as training sees them", columns=6, height=180, elem_id="bk-thumbs")
            notes = gr.Markdown(elem_id="bk-photo-notes")
            run_name = gr.Textbox(label="run name", info="Folder under the runs root; empty: token-class-date-time.")
            comps = form_components(gr, C.TRAIN_SECTIONS, TRAIN_MAIN, TRAIN_BY_RUN, "train")
            for name, value in preset_values(DEFAULT_PRESET, {}).items():
                comps[name].value = value
        with gr.Column(scale=3):
            button = gr.Button("Train", variant="primary", elem_id="bk-train")
            message = gr.Markdown(elem_id="bk-train-message")
            run = gr.Dropdown(label="run", choices=H.run_choices(queue), value=None, elem_id="bk-run",
                              info=f"Every run under {_shown(queue.root)}")
            status = gr.HTML(H.progress_html(None), elem_id="bk-progress")
            with gr.Row():
                cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="bk-cancel")
                resume = gr.Button("Resume", interactive=False, elem_id="bk-resume")
            # the colours are named in the label: gradio's box cuts off a legend drawn below the plot
            loss = gr.LinePlot(H.loss_frame([], False), x="step", y="loss", color="curve", color_map=H.LOSS_COLOURS,
                               colors_in_legend=[], label="loss: total (blue) = subject (orange) + λ · prior (green)",
                               elem_id="bk-loss")
            validation = gr.Gallery(label="validation samples (newest first)", columns=3, height=260,
                                    object_fit="contain", elem_id="bk-validation")
            weights = gr.File(label="weights", interactive=False, elem_id="bk-weights")
            with gr.Accordion("log and config", open=False):
                log = gr.Textbox(label="log", lines=4, interactive=False, elem_id="bk-log")
                config = gr.Code(label="config.toml", interactive=False, elem_id="bk-config")

    photos.change(H.inspect_photos, photos, [thumbs, notes], show_progress="hidden")
    form = list(comps.values())
    # on select (an option chosen), not input: the dropdown also sends input when it loses focus, and that second
    # fill, answered after a person (or the browser test) has started typing in the next field, overwrote the typing
    preset.select(lambda p, *vals: list(preset_values(p, dict(zip(comps, vals))).get(n, v)
                                       for n, v in zip(comps, vals)), [preset, *form], form)

    def train(data):
        name, said = H.start_training(queue, {**_named(comps, data), "photos": data[photos], "run_name": data[run_name]})
        return gr.update(choices=H.run_choices(queue), value=name), f"**{name}**: {said}"

    button.click(train, {photos, run_name, *form}, [run, message], api_name="train")

    def act(fn: Callable[[str], str]):
        def handler(name):
            with user_errors():
                return f"**{name}**: {fn(name or '')}"
        return handler

    cancel.click(act(queue.cancel), run, message, api_name="cancel")
    resume.click(act(queue.resume), run, message, api_name="resume")
    return dict(run=run, status=status, loss=loss, validation=validation, log=log, config=config, weights=weights,
                cancel=cancel, resume=resume)


def _generate_tab(gr, queue: R.RunQueue, tab) -> None:
    """Pick a finished run, then pictures, a sweep of guidance and LoRA scales, or an evaluation report."""
    gen_run = gr.Dropdown(label="run", choices=[], value=None, elem_id="bk-gen-run",
                          info="A finished run; its instance prompt (with the identifier) fills the prompts.")
    with gr.Tab("Pictures"), gr.Row():
        with gr.Column(scale=2):
            gen = form_components(gr, C.GENERATE_SECTIONS, GENERATE_MAIN, GENERATE_BY_RUN, "gen")
            with gr.Row():
                gen_button = gr.Button("Generate", variant="primary", elem_id="bk-generate")
                gen_stop = gr.Button("Stop", variant="stop", elem_id="bk-generate-stop")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="pictures (each PNG carries its parameters)", columns=4, elem_id="bk-gallery",
                                 buttons=["download", "fullscreen"])
            files = gr.File(label="download", file_count="multiple", interactive=False, elem_id="bk-downloads")
    with gr.Tab("Sweep"), gr.Row():
        with gr.Column(scale=2):
            sw = form_components(gr, SWEEP_SECTIONS, SWEEP_MAIN, GENERATE_BY_RUN, "sweep")
            with gr.Row():
                sweep_button = gr.Button("Sweep", variant="primary", elem_id="bk-sweep")
                sweep_stop = gr.Button("Stop", variant="stop", elem_id="bk-sweep-stop")
        with gr.Column(scale=3):
            sheets = gr.Gallery(label="contact sheets: columns guidance, rows (UNet, text-encoder) scale", columns=1,
                                object_fit="scale-down", elem_id="bk-sheets")
    with gr.Tab("Report"), gr.Row():
        with gr.Column(scale=2):
            samples = gr.Dropdown(label="samples", choices=[], info="A generation of this run (RUN/samples/NNN).")
            class_samples = gr.Dropdown(label="class samples", choices=[], info="Optional: a generation of the "
                                        "class prompt ('a photo of dog'), for PRES.")
            ev = form_components(gr, EVALUATE_SECTIONS, (), EVALUATE_BY_RUN, "eval")
            with gr.Row():
                eval_button = gr.Button("Evaluate", variant="primary", elem_id="bk-evaluate")
                eval_stop = gr.Button("Stop", variant="stop", elem_id="bk-evaluate-stop")
            report_file = gr.File(label="report.html", interactive=False)
        with gr.Column(scale=3):
            report = gr.HTML(H.report_html(None), elem_id="bk-report-view")

    def pick(name):
        d = H.run_defaults(queue, name)
        found = H.sample_choices(queue, name)
        pick_first = gr.update(choices=found, value=found[0] if found else None)
        return (d.get("prompt", gr.skip()), d.get("prompt", gr.skip()), d.get("clip_model", gr.skip()),
                d.get("dino_model", gr.skip()), pick_first, gr.update(choices=["", *found], value=""))

    def runs(current):  # on opening the tab: runs finished since, and the newest one if none is picked
        names = [n for _, n in H.run_choices(queue, finished=True)]
        return gr.update(choices=H.run_choices(queue, finished=True),
                         value=current if current in names else (names[0] if names else None))

    tab.select(runs, gen_run, gen_run)
    gen_run.change(pick, gen_run, [gen["prompt"], sw["prompt"], ev["clip_model"], ev["dino_model"], samples,
                                   class_samples])
    samples.change(lambda name, s: H.report_html(queue.folder(name) / "reports" / s / "report.html"
                                                 if name and s else None), [gen_run, samples], report)

    def generate(data, progress=gr.Progress()):
        for shown in H.generate(queue, data[gen_run], _named(gen, data), progress):
            if shown is H.UNCHANGED:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                continue
            found = H.sample_choices(queue, data[gen_run])  # the new generation can be evaluated at once
            yield *shown, gr.update(choices=found), gr.update(choices=["", *found])

    def sweep(data, progress=gr.Progress()):
        for shown in H.sweep(queue, data[gen_run], _named(sw, data), progress):
            yield gr.skip() if shown is H.UNCHANGED else shown

    generating = gen_button.click(generate, {gen_run, *gen.values()}, [gallery, files, samples, class_samples],
                                  api_name="generate")
    sweeping = sweep_button.click(sweep, {gen_run, *sw.values()}, sheets, api_name="sweep")
    # Stop: gradio closes the handler's stream, which stops the work between pictures or cells (handlers._streamed);
    # what was written stays, and a sweep run again makes only its missing cells
    gen_stop.click(None, None, None, cancels=[generating])
    sweep_stop.click(None, None, None, cancels=[sweeping])

    def evaluate(data):
        for shown in H.evaluate(queue, data[gen_run], data[samples], data[class_samples], _named(ev, data)):
            yield (gr.skip(), gr.skip()) if shown is H.UNCHANGED else shown

    evaluating = eval_button.click(evaluate, {gen_run, samples, class_samples, *ev.values()}, [report, report_file],
                                   api_name="evaluate")
    eval_stop.click(None, None, None, cancels=[evaluating])


def build_ui(root: str | Path = R.DEFAULT_ROOT):
    """The Blocks app over the runs under `root` (its RunQueue is `app.boothkit_runs`)."""
    gr = require_gradio()

    queue = R.RunQueue(root)
    with gr.Blocks(title="boothkit", analytics_enabled=False) as app:
        gr.Markdown("# boothkit\nDreamBooth for Stable Diffusion: the same options as `boothkit train`, "
                    f"`generate`, `sweep`, `evaluate` and `export`. Runs are kept in `{_shown(queue.root)}`.")
        with gr.Tab("Train"):
            panel = _train_tab(gr, queue)
        with gr.Tab("Generate") as tab:
            _generate_tab(gr, queue, tab)
        with gr.Tab("Export"), gr.Row():
            with gr.Column(scale=3):
                comps = form_components(gr, EXPORT_SECTIONS, EXPORT_MAIN, form="export")
            with gr.Column(scale=2):
                button = gr.Button("Export", variant="primary")
                written = gr.Textbox(label="written", interactive=False)
            button.click(lambda data: H.export(_named(comps, data)), set(comps.values()), written, api_name="export")
        _wire_panel(gr, app, queue, panel)
    app.boothkit_runs = queue
    return app


def _wire_panel(gr, app, queue: R.RunQueue, panel: Mapping[str, Any]) -> None:
    """Page load picks the running run (else the newest); picking a run redraws it; the timer keeps it current."""
    seen = gr.State({})
    outputs = [panel[k] for k in PANEL] + [panel["run"], seen]

    def on_load():
        found = queue.runs()
        active = [n for n, s in found if s.get("state") in R.ACTIVE]
        return gr.update(choices=H.run_choices(queue), value=(active or [n for n, _ in found] or [None])[0])

    app.load(on_load, None, panel["run"])
    panel["run"].change(lambda name: _panel_updates(gr, queue, name, None), panel["run"], outputs,
                        show_progress="hidden")
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(lambda name, s: _panel_updates(gr, queue, name, s), [panel["run"], seen], outputs,
               show_progress="hidden")


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, root: str | Path = R.DEFAULT_ROOT,
           **kwargs: Any):
    """Build and serve the UI (blocks until stopped unless prevent_thread_lock=True is passed)."""
    app = build_ui(root)
    # uploads are photos: anything larger is refused by the server before it is written anywhere
    kwargs.setdefault("max_file_size", MAX_UPLOAD)
    # the page shows pictures from the runs root only; gradio serves nothing else from this machine's disk
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(app.boothkit_runs.root)], **kwargs)
    return app
