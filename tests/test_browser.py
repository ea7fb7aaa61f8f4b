"""`boothkit ui` end to end in a real browser: headless Chromium (Debian's `chromium`, never a downloaded build)
driven by Playwright. Upload the demo photos, train the built-in tiny model while the progress bar and the loss
plot move, generate a picture, reload and find the run again. Screenshots go to out/browser-test/ (or
$BOOTHKIT_TEST_ARTIFACTS); BOOTHKIT_UPDATE_DOCS_SCREENSHOT=1 also copies the mid-run one to docs/ui-training.png.

Skipped, with the reason, where Playwright or Chromium is missing (`make install` installs both where it can);
BOOTHKIT_REQUIRE_BROWSER=1 turns that skip into a failure, for CI.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BOOTHKIT_TEST_ARTIFACTS") or REPO / "out" / "browser-test")
TOTAL_STEPS = 100
VALIDATE_EVERY = 25
VIEWPORT = {"width": 1400, "height": 1000}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _missing(reason: str):
    if os.environ.get("BOOTHKIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required (BOOTHKIT_REQUIRE_BROWSER=1), but {reason}")
    pytest.skip(reason)


def chromium_executable() -> str | None:
    """$BOOTHKIT_CHROMIUM, else the system's Chromium (Debian's binary first: its wrapper script only adds flags)."""
    candidates = [os.environ.get("BOOTHKIT_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    executable = chromium_executable()
    if executable is None:
        _missing("no Chromium found: apt-get install chromium (or set BOOTHKIT_CHROMIUM to a Chromium binary)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """`boothkit ui` (default root ./boothkit-runs) in this process, in a fresh folder, on a free port."""
    pytest.importorskip("gradio")
    from boothkit import ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    app = ui.launch("127.0.0.1", port, False, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", app.boothkit_runs
    app.boothkit_runs.close()
    app.close()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def _status(page) -> dict:
    el = page.locator("#bk-status")
    return {"state": el.get_attribute("data-state"), "step": int(el.get_attribute("data-step") or 0),
            "text": el.inner_text()}


LOSS_POINTS = """() => {  // points on the plot's total-loss line (vega draws it as one SVG path 'M x,y L x,y ...')
  const path = document.querySelector('#bk-loss path[aria-label*="curve: total"]');
  const d = path ? path.getAttribute('d') || '' : '';
  return d ? (d.match(/L/g) || []).length + 1 : 0;
}"""


def _shot(page, name: str, full: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=full)
    return path


def test_photos_to_pictures_in_a_browser(browser, server, demo_subject):
    from boothkit import ui

    url, queue = server
    clock = time.monotonic()
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(90_000)
    page.goto(url)
    page.wait_for_selector("#bk-train")
    assert "No runs yet" in page.locator("#bk-status").inner_text()

    # Photos: five thumbnails as training sees them, no complaints.
    photos = sorted(str(p) for p in demo_subject.glob("*.jpg"))
    page.locator("#bk-photos input[type=file]").set_input_files(photos)
    page.wait_for_function("document.querySelectorAll('#bk-thumbs img').length === 5")
    assert page.locator("#bk-photo-notes").inner_text().strip() == ""

    # The page opens on the mini preset; the quick-test one (tiny) gives a short run with validation pictures.
    assert _field(page, "train-model").input_value() == "mini"
    quick = next(name for name, preset in ui.PRESETS.items() if preset["model"] == "tiny")
    _field(page, "bk-preset").click()
    page.get_by_role("option", name=quick, exact=True).click()
    page.wait_for_function("document.querySelector('#train-model textarea, #train-model input')?.value === 'tiny'")
    for elem_id, value in (("train-class-noun", "dog"), ("train-max-steps", str(TOTAL_STEPS)),
                           ("train-num-class-images", "4"), ("train-validate-every", str(VALIDATE_EVERY))):
        _field(page, elem_id).fill(value)
    page.click("#bk-train")
    page.wait_for_function("document.querySelector('#bk-train-message')?.innerText.includes('starting')")

    # Mid-run, after the first validation: the bar moves with an ETA, the loss line grows, the pictures are shown
    # (one refresh reads the log and the pictures, so a step past the first validation comes with its picture).
    page.wait_for_function(f"""() => {{
        const el = document.querySelector('#bk-status');
        const step = +el?.dataset.step;
        return el?.dataset.state === 'running' && step > {VALIDATE_EVERY} && step < {TOTAL_STEPS}
               && el.innerText.includes('ETA');
    }}""")
    mid = _status(page)
    points_mid = page.evaluate(LOSS_POINTS)
    training_png = _shot(page, "training.png")
    assert VALIDATE_EVERY < points_mid < TOTAL_STEPS and f"step {mid['step']}/{TOTAL_STEPS}" in mid["text"], \
        (mid, points_mid)
    assert page.locator("#bk-validation img").count() >= 1
    assert page.locator("#bk-cancel").is_enabled()
    if os.environ.get("BOOTHKIT_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copy(training_png, REPO / "docs" / "ui-training.png")

    # A reload mid-run: the training goes on in the server, and the page picks the running run again.
    run = queue.runs()[0][0]
    page.reload()
    page.wait_for_function(f"document.querySelector('#bk-run input')?.value.startsWith('{run} (')")
    page.wait_for_function(f"+document.querySelector('#bk-status')?.dataset.step >= {mid['step']}")
    page.wait_for_function("document.querySelector('#bk-status')?.dataset.state === 'done'")
    page.wait_for_function(f"({LOSS_POINTS})() === {TOTAL_STEPS}")  # every step drawn
    assert page.locator("#bk-validation img").count() == TOTAL_STEPS // VALIDATE_EVERY
    assert not page.locator("#bk-cancel").is_enabled()
    assert queue.root == Path.cwd().resolve() / "boothkit-runs"  # the default root, in the working folder
    assert (queue.root / run / "pytorch_lora_weights.safetensors").is_file()
    _shot(page, "trained.png", full=True)
    page.locator("#bk-loss").screenshot(path=str(ARTIFACTS / "loss.png"))
    trained_s = time.monotonic() - clock

    # Generate: the finished run is picked and its identifier fills the prompt; the picture carries its parameters.
    page.get_by_role("tab", name="Generate").click()
    page.wait_for_function(f"document.querySelector('#bk-gen-run input')?.value.startsWith('{run}')")
    page.wait_for_function("document.querySelector('#gen-prompt textarea')?.value === 'a photo of sks dog'")
    _field(page, "gen-steps").fill("2")
    _field(page, "gen-num-images").fill("1")
    page.click("#bk-generate")
    page.wait_for_function("document.querySelectorAll('#bk-gallery img').length === 1")
    src = page.locator("#bk-gallery img").first.get_attribute("src")
    png = page.request.get(src).body()
    assert png.startswith(b"\x89PNG") and b"parameters" in png and b"UNet scale: 0.8, TE scale: 0.8" in png
    _shot(page, "generate.png", full=True)

    # Reload: the run is listed with its state, progress, loss curve and pictures.
    page.reload()
    page.wait_for_function(f"document.querySelector('#bk-run input')?.value === '{run} (done)'")
    page.wait_for_function("document.querySelector('#bk-status')?.dataset.state === 'done'")
    page.wait_for_function(f"({LOSS_POINTS})() === {TOTAL_STEPS}")
    page.wait_for_function(f"document.querySelectorAll('#bk-validation img').length === {TOTAL_STEPS // VALIDATE_EVERY}")
    _shot(page, "reloaded.png")
    print(f"\nbrowser test: trained after {trained_s:.1f} s, all done after {time.monotonic() - clock:.1f} s; "
          f"screenshots in {ARTIFACTS}")
