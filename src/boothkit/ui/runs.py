"""Training runs kept on disk under one root folder, and the queue that trains them one at a time (the UI's back end).

ROOT/<run>/ is an ordinary `boothkit train` output folder, plus three files of the queue's own:

    run.json       state (queued, running, done, cancelled, failed, stopped), message, times, which server ran it
    run.log        boothkit's log messages of the run (a token that splits, a photo that is too small)
    request.toml   the config as submitted: what Resume trains from (config.toml appears only at the first step)

Everything a page shows is read from these files, so a reloaded page or a restarted server finds every run. The
queue itself lives in the server process: one worker thread trains one run at a time through
`train.run_training`, the same function as `boothkit train`. A run that a stopped server was running (or had
queued) is marked stopped when the next server opens the root; Resume continues it from its newest checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import config as C
from ..core.errors import BoothkitError, ConfigError, Interrupted
from ..core.files import atomic_write_bytes, slug
from ..core.locks import LockHeld, lock_file

# Modules that load torch (train, generate, models, adapters) are imported inside the functions that use them:
# the CLI imports this module for its flags, and `boothkit --help` must start without torch (tests/test_cli.py).

log = logging.getLogger("boothkit")

DEFAULT_ROOT = "boothkit-runs"
STATUS, LOG, REQUEST = "run.json", "run.log", "request.toml"
ROOT_LOCK = ".boothkit-ui.lock"  # one server per root: another would mark this one's running runs stopped
ACTIVE = ("queued", "running")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")  # one folder name: never a path out of the root


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for a progress bar: steps done of total, seconds per step and time left (None: unknown)."""

    state: str
    message: str
    step: int
    total: int
    seconds_per_step: float | None = None
    eta: float | None = None


def read_log(folder: Path) -> list[dict[str, float]]:
    """train_log.csv as numbers (empty before the first step; a cell training left blank is left out)."""
    try:
        with (folder / "train_log.csv").open() as fh:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    except (OSError, ValueError):  # not written yet (or replaced under us: the next poll reads it)
        return []


def validation_grids(folder: Path) -> list[tuple[Path, int]]:
    """(grid.png, step) of every validation written so far, newest first."""
    grids = [(p, int(p.parent.name.split("-")[1])) for p in (folder / "validation").glob("step-*/grid.png")]
    return sorted(grids, key=lambda g: -g[1])


def weights(folder: Path) -> Path | None:
    """The finished run's LoRA file, full model folder or (--method ti) embeddings, if training got that far."""
    from ..adapters.lora import LORA_FILE

    # learned_embeds.safetensors: what a Textual Inversion run writes instead of a LoRA (boothkit.adapters.embeddings)
    found = (folder / LORA_FILE, folder / "model", folder / "learned_embeds.safetensors")
    return next((p for p in found if p.exists()), None)


def _config_path(folder: Path) -> Path:
    return folder / "config.toml" if (folder / "config.toml").is_file() else folder / REQUEST


def run_config(folder: Path) -> C.RunConfig:
    """The run's resolved config (config.toml), else the one it was submitted with."""
    path = _config_path(folder)
    return C.resolve(C.TRAIN_SECTIONS, C.load_toml(path), where=str(path))


def run_settings(folder: Path) -> dict[str, dict[str, Any]]:
    """The same file as plain TOML tables, unchecked: what a page polls for display (no warnings every second)."""
    try:
        return C.load_toml(_config_path(folder))
    except BoothkitError:
        return {}


class _RunLog(logging.Handler):
    """Appends the worker thread's boothkit messages to the run's run.log (other threads' are not this run's)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path, self.thread = path, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(f"{record.levelname.lower()}: {record.getMessage()}\n")


@dataclass
class _Job:
    name: str
    cfg: C.RunConfig
    stop: threading.Event


class RunQueue:
    """The runs under `root` and the one worker thread that trains them in order."""

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.root = C.check_output(root, "--root").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_lock = self._lock_root()
        self.server = uuid.uuid4().hex  # tells this server's runs from those of one that stopped
        self._lock = threading.Condition()
        self._waiting: list[_Job] = []
        self._current: _Job | None = None
        self._pace: dict[str, tuple[int, float]] = {}  # run -> first (step, time) seen, for the ETA
        self._worker: threading.Thread | None = None
        self._recover()

    def _lock_root(self) -> int | None:
        """A lock on ROOT/.boothkit-ui.lock for this queue's life (the kernel drops it if the server dies)."""
        try:
            return lock_file(self.root / ROOT_LOCK)
        except LockHeld:
            raise ConfigError(f"--root {self.root}: another boothkit ui is serving these runs; stop it or choose "
                              f"another --root") from None

    # ------------------------------------------------------------------------------------ run folders

    def folder(self, name: str) -> Path:
        """ROOT/name for a run name (a ConfigError names a name that is not one folder name)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"run name {name!r}: use up to 80 letters, digits, '.', '_' and '-'")
        return self.root / name

    def new_name(self, token: str, class_noun: str) -> str:
        """<token>-<class noun>-<date-time>, unique under the root."""
        token, noun = (slug(t, 40, keep_case=True, empty="run") for t in (token, class_noun or "subject"))
        base = f"{token}-{noun}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, n = base, 1
        while (self.root / name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def status(self, name: str) -> dict[str, Any]:
        """run.json of a run; a folder made by `boothkit train --output-dir ROOT/x` has none: done or unfinished."""
        folder = self.folder(name)
        try:
            return json.loads((folder / STATUS).read_text())
        except (OSError, ValueError):
            done = weights(folder) is not None
            return {"state": "done" if done else "unfinished", "message": "" if done else "no weights yet",
                    "created": folder.stat().st_mtime if folder.exists() else 0.0}

    def hides_earlier(self, name: str) -> bool:
        """A fresh run still queued: the log and pictures in its folder are an earlier attempt's, kept until it
        starts (a cancel leaves them), and not shown as its own."""
        status = self.status(name)
        return status.get("state") == "queued" and bool(status.get("fresh"))

    def _write_status(self, name: str, **changes: Any) -> dict[str, Any]:
        with self._lock:
            path = self.folder(name) / STATUS
            status = json.loads(path.read_text()) if path.is_file() else {}
            status.update(changes, server=self.server)
            atomic_write_bytes(path, (json.dumps(status, indent=1) + "\n").encode())
            return status

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, status) of every run folder under the root, newest first."""
        names = [p.name for p in self.root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)
                 and ((p / STATUS).is_file() or (p / "config.toml").is_file())]
        found = [(n, self.status(n)) for n in names]
        return sorted(found, key=lambda r: -float(r[1].get("created") or 0))

    def _recover(self) -> None:
        """Runs left queued or running by a server that stopped: marked stopped, resumable from a checkpoint."""
        for name, status in self.runs():
            if status.get("state") in ACTIVE and status.get("server") != self.server:
                self._write_status(name, state="stopped", finished=time.time(),
                                   message="the server stopped during this run; Resume continues it"
                                           + (" from its newest checkpoint" if self._checkpointed(name) else ""))

    def _checkpointed(self, name: str) -> bool:
        from ..train.checkpoint import list_checkpoints

        return bool(list_checkpoints(self.folder(name)))

    # ------------------------------------------------------------------------------------------ queue

    def submit(self, cfg: C.RunConfig, name: str) -> str:
        """Queue a training run whose output folder is ROOT/name; says whether it starts now or waits."""
        folder = self.folder(name)
        if Path(cfg.train.output_dir).resolve() != folder:
            raise ConfigError(f"train.output_dir must be the run folder {folder}")
        cfg = cfg.replace("train", log_every=1)  # every step logged: the loss plot grows step by step
        with self._lock:
            self.check_idle(name)
            folder.mkdir(parents=True, exist_ok=True)
            C.save_toml(folder / REQUEST, cfg.to_dict())
            self._pace.pop(name, None)
            created = self.status(name).get("created") if cfg.train.resume else None  # a resumed run keeps its place
            # a fresh run replaces an earlier attempt's log and pictures when it starts, not now: until then a
            # cancel or a refusal leaves them as they were (the run panel hides them meanwhile: `hides_earlier`)
            self._write_status(name, state="queued", message="", created=created or time.time(), started=None,
                               finished=None, max_steps=cfg.train.max_steps, fresh=not cfg.train.resume)
            self._waiting.append(_Job(name, cfg, threading.Event()))
            ahead = len(self._waiting) - 1 + (self._current is not None)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="boothkit-train", daemon=True)
                self._worker.start()
            self._lock.notify_all()
        return f"queued: {ahead} run{'s' * (ahead != 1)} ahead" if ahead else "starting"

    def check_idle(self, name: str) -> None:
        """A queued or running run's folder is its own until it ends: nothing else may write there."""
        state = self.status(name).get("state") if self.folder(name).exists() else None
        if state in ACTIVE:
            raise ConfigError(f"run {name} is {state}; cancel it first or choose another name")

    def resume(self, name: str) -> str:
        """Train a stopped, cancelled or failed run again: from its newest checkpoint if it has one."""
        folder = self.folder(name)
        self.check_idle(name)
        if weights(folder) is not None:
            raise ConfigError(f"run {name} is finished; start a new run to train more")
        cfg, resume = run_config(folder), self._checkpointed(name)
        # trained again from step 0 (no checkpoint): the earlier attempt's log and pictures go when it starts
        return self.submit(cfg.replace("train", resume=resume, overwrite=False), name)

    def cancel(self, name: str) -> str:
        """A queued run leaves the queue; the running one stops after its current step (checkpointed if on)."""
        with self._lock:
            for job in self._waiting:
                if job.name == name:
                    self._waiting.remove(job)
                    self._write_status(name, state="cancelled", message="cancelled before it started",
                                       finished=time.time())
                    return "cancelled before it started"
            if self._current is not None and self._current.name == name:
                self._current.stop.set()
                return "stopping after the current step"
        raise ConfigError(f"run {name} is not queued or running")

    def position(self, name: str) -> int | None:
        """How many runs train before a queued one (None: not waiting)."""
        with self._lock:
            names = [j.name for j in self._waiting]
            return names.index(name) + (self._current is not None) if name in names else None

    def wait(self, name: str, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the run is neither queued nor running (for scripts and tests); returns its status."""
        deadline = time.monotonic() + timeout
        while (status := self.status(name)).get("state") in ACTIVE:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {name} still {status['state']} after {timeout:.0f} s")
            time.sleep(0.1)
        return status

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._lock.wait()
                self._current = job = self._waiting.pop(0)
            try:
                self._train(job)
            finally:
                with self._lock:
                    self._current = None

    def _train(self, job: _Job) -> None:
        from ..train.loop import run_training

        folder, start = self.folder(job.name), time.time()
        if not job.cfg.train.resume:  # from step 0: an earlier attempt's log and pictures are not this run's
            remove_outputs(folder)
        self._write_status(job.name, state="running", started=start, message="")
        handler = _RunLog(folder / LOG)
        log.addHandler(handler)
        try:
            run_training(job.cfg, progress=False, stop=job.stop)
        except Interrupted as exc:
            self._write_status(job.name, state="cancelled", message=str(exc), finished=time.time())
        except BoothkitError as exc:
            self._write_status(job.name, state="failed", message=str(exc), finished=time.time())
        except Exception as exc:  # a bug or an out-of-memory: the run fails, the server and its queue go on
            log.exception("run %s failed", job.name)
            self._write_status(job.name, state="failed", message=f"{type(exc).__name__}: {exc}", finished=time.time())
        else:
            self._write_status(job.name, state="done", finished=time.time(),
                               message=f"{job.cfg.train.max_steps} steps in {time.time() - start:.0f} s")
        finally:
            log.removeHandler(handler)

    # --------------------------------------------------------------------------------------- progress

    def progress(self, name: str) -> Progress:
        """State, step and ETA of a run; the ETA comes from the pace of steps seen since this server first looked."""
        folder, status = self.folder(name), self.status(name)
        state, message = status.get("state", "unfinished"), status.get("message", "")
        rows = [] if self.hides_earlier(name) else read_log(folder)
        step = int(rows[-1]["step"]) if rows else 0
        total = int(status.get("max_steps") or 0) or self._max_steps(folder)
        if state == "queued":
            ahead = self.position(name)
            message = f"{ahead} run{'s' * (ahead != 1)} ahead" if ahead else "starting"
        if state != "running" or not rows:
            if state == "running":
                message = self._preparing(folder)
            return Progress(state, message, step, total)
        when = (folder / "train_log.csv").stat().st_mtime  # the log is rewritten at every step: its time is the step's
        first = self._pace.setdefault(name, (step, when))
        pace = (when - first[1]) / (step - first[0]) if step > first[0] else None
        return Progress(state, message, step, total, pace, None if pace is None else pace * (total - step))

    @staticmethod
    def _max_steps(folder: Path) -> int:
        """A run made outside the queue records no total in run.json: its config's (0: none readable)."""
        steps = run_settings(folder).get("train", {}).get("max_steps", C.TrainConfig.max_steps)
        return steps if isinstance(steps, int) else 0

    @staticmethod
    def _preparing(folder: Path) -> str:
        """What a running run does before its first step: class images are counted as they are written."""
        prior = {**dataclasses.asdict(C.PriorConfig()), **run_settings(folder).get("prior", {})}
        class_dir = Path(prior.get("class_dir") or folder / "class_images")
        wanted = prior["num_class_images"]
        if prior["prior"] and prior["prior_images"] == "class" and class_dir.is_dir():
            made = min(len(list(class_dir.glob("class-*.png"))), wanted)
            if made < wanted:
                return f"class images {made}/{wanted}"
        return "loading the model and photos"

    def close(self, timeout: float = 60.0) -> None:
        """Empty the queue, stop the running run and let another queue open the root (tests; a server just exits)."""
        with self._lock:
            for job in list(self._waiting):
                self.cancel(job.name)
            current = self._current
            if current is not None:
                current.stop.set()
        if current is not None:
            self.wait(current.name, timeout)
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None


def remove_outputs(folder: Path) -> None:
    """What a run trained again from step 0 must not show as its own: the earlier log, UI log and pictures."""
    (folder / "train_log.csv").unlink(missing_ok=True)
    (folder / LOG).unlink(missing_ok=True)
    shutil.rmtree(folder / "validation", ignore_errors=True)
