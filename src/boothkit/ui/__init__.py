"""`boothkit ui`: a Gradio front end (train and watch runs, generate, sweep, evaluate, export) over the CLI's functions.

Forms are made from the config dataclasses and resolved like CLI flags (``forms``), so the UI cannot drift from
the CLI and holds no training or generation logic of its own; the buttons call the CLI's functions
(``handlers``). Runs live on disk under one root, trained one at a time by ``boothkit.ui.runs.RunQueue``; the page
(``app``) polls the run folder, so a reload or a restarted server shows every run. gradio is imported inside
functions: it is an optional extra (``boothkit[ui]``).
"""
from .app import MAX_UPLOAD, build_ui, launch
from .forms import (
    DEFAULT_PRESET,
    PRESETS,
    TRAIN_BY_RUN,
    UI_DEFAULTS,
    config_value,
    form_defaults,
    form_value,
    preset_values,
    resolve_form,
    user_errors,
)
from .handlers import (
    UPLOAD_DIR,
    copy_photos,
    evaluate,
    export,
    generate,
    inspect_photos,
    loss_frame,
    progress_html,
    report_html,
    run_choices,
    run_defaults,
    run_view,
    sample_choices,
    start_training,
    sweep,
    train_config,
)

__all__ = ["MAX_UPLOAD", "build_ui", "launch", "DEFAULT_PRESET", "PRESETS", "TRAIN_BY_RUN", "UI_DEFAULTS",
           "config_value", "form_defaults", "form_value", "preset_values", "resolve_form", "user_errors", "UPLOAD_DIR",
           "copy_photos", "evaluate", "export", "generate", "inspect_photos", "loss_frame", "progress_html", "report_html",
           "run_choices", "run_defaults", "run_view", "sample_choices", "start_training", "sweep", "train_config"]
