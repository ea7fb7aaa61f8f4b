"""Forms made from the config dataclasses: one input per field (type, choices, default, help text), and form
values resolved through ``config.resolve`` exactly like CLI flags, so the UI cannot drift from the CLI."""
from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, Iterator, Mapping

from ..core import config as C
from ..core.errors import BoothkitError, ConfigError
from ..core.presets import flat, model_preset_flags, recipe, recipe_titles

TRAIN_MAIN = ("token", "class_noun", "instance_prompt", "model", "max_steps", "learning_rate", "rank",
              "train_text_encoder", "prior", "num_class_images", "validate_every", "checkpoint_every")
GENERATE_MAIN = ("prompt", "negative_prompt", "guidance", "unet_scale", "text_encoder_scale", "steps", "seed",
                 "num_images")
SWEEP_MAIN = ("prompt", "guidance", "unet_scale", "text_encoder_scale", "num_images", "steps", "seed")
EXPORT_MAIN = ("format", "lora", "out")
# Fields the run decides, not the form: where it writes, what it loads, and what the queue sets.
TRAIN_BY_RUN = ("output_dir", "log_every", "resume")
GENERATE_BY_RUN = ("lora", "out")
EVALUATE_BY_RUN = ("samples", "real_dir", "class_samples", "prompt", "out")

# Form values that differ from the dataclass default: the sweep form offers scales around the default one.
UI_DEFAULTS: dict[str, dict[str, Any]] = {
    "SweepConfig": {"unet_scale": "0.4,0.8,1", "text_encoder_scale": "0,0.8", "num_images": 2},
}
SLIDERS = {"unet_scale": (0.0, 1.5, 0.05), "text_encoder_scale": (0.0, 1.5, 0.05)}

SUBJECT = ("instance_dir", "token", "class_noun")  # a preset leaves these as typed


def _preset(name: str) -> dict[str, Any]:
    """A training recipe as form values: the model's own recipe, then the named one's (presets/recipes/)."""
    values = flat(recipe(name))
    return {**model_preset_flags(values["model"]), **values}


# The presets are the training recipes (presets/recipes.toml), by title. The first is what the page opens on: mini,
# a pretrained model that learns a subject on a CPU (tiny draws noise).
PRESETS: dict[str, dict[str, Any]] = {title: _preset(name) for name, title in recipe_titles().items()}
DEFAULT_PRESET = next(iter(PRESETS))


def require_gradio():
    """The gradio module, or one line saying how to install it."""
    try:
        import gradio as gr
    except ImportError:
        raise BoothkitError("the UI needs gradio: pip install 'boothkit[ui]'") from None
    return gr


# ------------------------------------------------------------------------------------ fields <-> forms

def _fields(sections: Mapping[str, type]) -> dict[str, tuple[dataclasses.Field, Any, type]]:
    """Field name -> (dataclass field, type hint, its class) over all sections (names are unique per command)."""
    out = {}
    for cls in sections.values():
        hints = typing.get_type_hints(cls)
        out.update({f.name: (f, hints[f.name], cls) for f in dataclasses.fields(cls)})
    return out


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)][0], True
    return tp, False


def form_value(field: dataclasses.Field, tp: Any, cls: type | None = None) -> Any:
    """What the form shows at first (tuples one item per line, None as empty text; UI_DEFAULTS first)."""
    default = UI_DEFAULTS.get(getattr(cls, "__name__", ""), {}).get(field.name, field.default)
    if typing.get_origin(_unwrap(tp)[0]) is tuple:
        return "\n".join(default)
    return "" if default is None else default


def form_defaults(sections: Mapping[str, type]) -> dict[str, Any]:
    """Every field's form value as the page first shows it."""
    return {name: form_value(*spec) for name, spec in _fields(sections).items()}


def config_value(tp: Any, value: Any) -> Any:
    """A form value -> the value a TOML file or CLI flag would give (config.resolve validates it)."""
    tp, optional = _unwrap(tp)
    if typing.get_origin(tp) is tuple:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if optional and value in ("", None):
        return None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # gr.Number and gr.Slider may hand back 2.0 for 2
    return value


def resolve_form(sections: Mapping[str, type], values: Mapping[str, Any]) -> C.RunConfig:
    """Form values -> RunConfig through config.resolve, the CLI's validation (errors name section.key)."""
    fields = _fields(sections)
    overrides = {name: config_value(fields[name][1], v) if name in fields else v for name, v in values.items()}
    return C.resolve(sections, {}, overrides)


def _component(gr, field: dataclasses.Field, tp: Any, cls: type, form: str = ""):
    """A gradio input for one config field: widget by type and choices, default and help from the dataclass
    (elem_id FORM-FIELD-NAME, e.g. gen-unet-scale, for scripts and tests)."""
    base, optional = _unwrap(tp)
    kw = dict(label=field.name.replace("_", " "), info=field.metadata.get("help"), value=form_value(field, tp, cls),
              elem_id=f"{form}-{field.name.replace('_', '-')}" if form else None)
    choices = field.metadata.get("choices")
    if choices:
        opts = ([("(default)", "")] if optional else []) + [(str(c), c) for c in choices]
        return gr.Dropdown(choices=opts, **kw)
    if typing.get_origin(base) is tuple:
        kw["info"] = f"{kw['info']} One per line."
        return gr.Textbox(lines=2, **kw)
    if base is bool:
        return gr.Checkbox(**kw)
    if base is float and not optional and field.name in SLIDERS:
        lo, hi, step = SLIDERS[field.name]
        return gr.Slider(lo, hi, step=step, **kw)
    if base in (int, float):
        return gr.Number(precision=0 if base is int else None, **kw)
    return gr.Textbox(**kw)


def form_components(gr, sections: Mapping[str, type], main: tuple[str, ...], skip: tuple[str, ...] = (),
                    form: str = "") -> dict[str, Any]:
    """Components for the `main` fields, then an Advanced accordion with every other field not in `skip`."""
    fields = _fields(sections)
    comps = {name: _component(gr, *fields[name], form) for name in main}
    with gr.Accordion("Advanced", open=False):
        comps.update({name: _component(gr, *spec, form) for name, spec in fields.items() if name not in comps
                      and name not in skip})
    return comps


def preset_values(name: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The train form under a preset: every field at its default, then the preset's; the subject stays as typed."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: not one of {', '.join(PRESETS)}")
    values = {k: v for k, v in form_defaults(C.TRAIN_SECTIONS).items() if k not in TRAIN_BY_RUN}
    values.update({k: v for k, v in PRESETS[name].items() if k not in SUBJECT})
    values.update({k: current[k] for k in SUBJECT if k in current})
    return values


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A BoothkitError (bad key, value, file) shows as a one-line gr.Error, never a traceback."""
    try:
        yield
    except BoothkitError as exc:
        raise require_gradio().Error(str(exc), print_exception=False) from None
