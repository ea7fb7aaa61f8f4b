"""Property-based tests (hypothesis) of what users type and hand in: any value for any config key, any bytes as a
photo or a LoRA file, any prompt template. The promise of docs/errors.md: it works, or a one-line error names the
key or the file; never a traceback. A bounded number of examples (`EXAMPLES`), fixed by a seed, so `make test` runs
the same cases on every machine, in well under a minute; findings are kept below as `@example`s."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from boothkit.core import config as C
from boothkit.core.errors import BoothkitError, ConfigError
from boothkit.evaluate.bench import DREAMBENCH_SECTIONS
from boothkit.evaluate.metrics import EVALUATE_SECTIONS
from boothkit.evaluate.sweep import SWEEP_SECTIONS

EXAMPLES = 60
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECTIONS = {"train": C.TRAIN_SECTIONS, "generate": C.GENERATE_SECTIONS, "sweep": SWEEP_SECTIONS,
            "evaluate": EVALUATE_SECTIONS, "dreambench": DREAMBENCH_SECTIONS}
KEYS = sorted({(command, section, f.name) for command, sections in SECTIONS.items()
               for section, cls in sections.items() for f in dataclasses.fields(cls)})

# what TOML can hold (and a CLI flag's text): every type, with the edge values that break naive checks
toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30) | st.sampled_from(["", " ", "auto", "none", "0", "-1", "1e9", "nan", "{token}", "~", ".."]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@pytest.mark.parametrize("command, section, key", KEYS, ids=[".".join(k) for k in KEYS])
def test_any_value_for_any_key_is_taken_or_refused_naming_the_key(command, section, key):
    @settings(PROPERTY, max_examples=8)  # a few each: there are hundreds of keys
    @given(value=toml_values)
    @example(value=math.nan)
    @example(value=[[]])
    def check(value):
        try:
            C.resolve(SECTIONS[command], {section: {key: value}})
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text.strip()
            # a refusal names this key, or (for a value that is fine alone) the key the config still lacks
            assert f"{section}.{key}" in text or " is required" in text, (value, text)

    check()


@PROPERTY
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000), kind=st.sampled_from(["JPEG", "PNG", "WEBP", "GIF"]))
def test_any_bytes_as_a_photo_load_as_rgb_or_are_refused_naming_the_file(tmp_path_factory, data, cut, kind):
    from boothkit.train.data import load_image

    folder = tmp_path_factory.mktemp("photo")
    good = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(good, format=kind)
    for name, payload in (("random.jpg", data), ("cut." + kind.lower(), good.getvalue()[:cut]),
                          ("spliced.png", good.getvalue()[:cut] + data)):
        path = folder / name
        path.write_bytes(payload)
        try:
            img = load_image(path)
        except BoothkitError as exc:
            assert name in str(exc) and "\n" not in str(exc).strip()
        else:
            assert img.mode == "RGB" and img.size[0] > 0


@PROPERTY
@given(header=st.binary(max_size=64), length=st.integers(0, 2**64 - 1), body=st.binary(max_size=200))
@example(header=b'{"__metadata__": {"lora_adapter_metadata": "{"}}', length=0, body=b"")
def test_any_bytes_as_a_lora_file_are_refused_naming_the_file(tmp_path_factory, header, length, body):
    from boothkit.adapters.lora import lora_header

    path = tmp_path_factory.mktemp("lora") / "x.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header + body)
    with pytest.raises(BoothkitError) as exc:
        lora_header(str(path))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value).strip()


@PROPERTY
@given(template=st.text(max_size=40) | st.sampled_from(["{token}", "{class_noun}", "{", "}", "{0}", "{token!r}",
                                                         "{token:>99999999}", "{__class__}", "{token.upper}",
                                                         "{{token}}", "a {photo} of {token}"]))
def test_any_prompt_template_fills_or_is_refused_naming_its_key(template):
    values = {"model": "tiny", "instance_dir": "photos", "class_noun": "dog", "output_dir": "run"}
    try:
        cfg = C.resolve(C.TRAIN_SECTIONS, {}, {**values, "instance_prompt": template})
    except ConfigError as exc:
        assert "data.instance_prompt" in str(exc) and "\n" not in str(exc).strip()
        return
    assert isinstance(cfg.data.prompt, str)  # filled: the identifier and noun went in, nothing else ran


def test_the_keys_are_all_covered():
    # every command's every key is in the property test above (a new section must be added to SECTIONS)
    assert len(KEYS) > 150 and {k for _, _, k in KEYS} >= {"max_steps", "learning_rate", "guidance", "lora"}
