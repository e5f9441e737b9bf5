"""Run directory: resolved config, git SHA, per-step JSONL, checkpoints written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, runs may then train a shared base twice
    fcntl = None  # type: ignore[assignment]


def git_sha(cwd: Optional[Path] = None) -> Optional[str]:
    """The SHA of the checkout the package runs from (None outside a git checkout)."""
    here = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are written through a temp file (mkstemp makes it 0600) and get the mode a plain open()
# would give them under the user's umask.
FILE_MODE = 0o666 & ~_umask()
# A temp file of a target this old is left over from a killed writer (a checkpoint takes seconds).
STALE_TEMP_S = 600.0


def temp_beside(path: Path) -> str:
    """A new temp file next to `path` for an atomic write, after removing the stale ones a killed
    writer of the same target left (callers hold the target's lock, so no live writer is touched)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - old.stat().st_mtime > STALE_TEMP_S:
                old.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class LockHeld(Exception):
    """Another process holds the lock asked for without waiting."""


@contextlib.contextmanager
def exclusive(path: Path, on_wait: Optional[Callable[[], None]] = None, wait: bool = True) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing) for the block; another process that asks
    for it waits (after calling `on_wait`), or gets LockHeld if not `wait`. The OS drops the
    lock if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockHeld(str(path)) from None
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save into a temp file then rename, so a crash never leaves a half-written checkpoint."""
    tmp = temp_beside(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable ciss checkpoint ({exc})") from None


class RunDir:
    """One experiment's folder.

    config.yaml     the resolved configuration
    meta.json       git SHA, seed, versions, command line, start time
    results.jsonl   one JSON object per evaluated step (per-class IoU and mIoU old/new/all)
    losses.jsonl    one JSON object per epoch (mean of every loss term)
    table.txt       the per-step table as printed
    ckpt/step-<t>.pt, ckpt/last.pt
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            (self.path / "ckpt").mkdir(parents=True, exist_ok=True)
        elif not (self.path / "config.yaml").is_file():
            raise FileNotFoundError(f"{self.path} is not a ciss run directory (no config.yaml)")

    # -- files ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def step_ckpt(self, step: int) -> Path:
        return self.path / "ckpt" / f"step-{step}.pt"

    def checkpointed_steps(self) -> list[int]:
        """Steps with a step checkpoint, in order."""
        return sorted(int(p.stem.split("-")[1]) for p in (self.path / "ckpt").glob("step-*.pt"))

    @property
    def last_ckpt(self) -> Path:
        return self.path / "ckpt" / "last.pt"

    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(cfg, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a ciss run directory (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text())

    def write_meta(self, seed: int, extra: Optional[dict] = None) -> None:
        meta = {
            "git_sha": git_sha(),
            "seed": seed,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            # CPU float sums depend on both: a step retrained at another thread count (measured) or
            # instruction set can differ in its last bits from the first epoch on.
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta.update(extra or {})
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2))

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(dumps(record) + "\n")
            f.flush()

    def read_jsonl(self, name: str) -> list[dict]:
        p = self.path / name
        if not p.is_file():
            return []
        rows = []
        for line in p.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything before it is valid
        return rows

    def step_state(self, step: int) -> dict[str, Any]:
        """The checkpoint of `step`, refused (naming the file) when it is not this run's: another step,
        or a model of another architecture than the run's config."""
        path = self.step_ckpt(step)
        state = load_checkpoint(path)
        model = (self.read_config().get("model") or {}) if self.config_path.is_file() else {}
        have = state.get("model_config") or {}
        wrong = [f"{k} {have.get(k)!r} (the run's: {model[k]!r})" for k in ("backbone", "head_channels")
                 if k in model and have.get(k) != model[k]]
        if state.get("step") != step:
            wrong.insert(0, f"step {state.get('step')!r}")
        if wrong:
            raise ValueError(f"{path} is not this run's checkpoint of step {step}: it holds "
                             f"{', '.join(wrong)}; put the run's own file back or retrain the step")
        return state

    def keep_losses(self, step: int, upto: Optional[tuple[int, int]]) -> None:
        """Drop the losses.jsonl rows of work a resume redoes: those of `step` after (phase index,
        epoch) `upto` (all of them when None) and of later steps; a row cut by a crash goes too."""
        rows = self.read_jsonl("losses.jsonl")
        kept = [r for r in rows if int(r["step"]) < step or int(r["step"]) == step and upto is not None
                and (int(r.get("phase_index", 0)), int(r["epoch"])) <= upto]
        path = self.path / "losses.jsonl"
        text = "".join(dumps(r) + "\n" for r in kept)  # as append_jsonl writes them
        if path.is_file() and path.read_text() != text:
            atomic_write_text(path, text)

    def step_results(self) -> dict[int, dict]:
        """The latest evaluation record of each step."""
        out: dict[int, dict] = {}
        for row in self.read_jsonl("results.jsonl"):
            out[int(row["step"])] = row
        return out

    def kept_wall_time(self, before_step: Optional[int] = None) -> float:
        """Seconds of training and evaluation the run kept over all its invocations (only the steps
        before `before_step` if given); the part of a step cut by a crash and redone is not counted."""
        rows = self.read_jsonl("results.jsonl")
        return kept_wall_time([r for r in rows if before_step is None or int(r["step"]) < before_step])

    def write_summary(self, summary: dict) -> None:
        """summary.json: the final figures (wall_time_s: this invocation; run_wall_time_s: all of them)."""
        atomic_write_text(self.path / "summary.json", dumps(summary, indent=2))

    def read_summary(self) -> dict:
        """summary.json with its figures' nulls read back as NaN ({} when there is none)."""
        p = self.path / "summary.json"
        return loads(p.read_text()) if p.is_file() else {}


# Figures that are NaN when undefined (mIoU of no class, IoU of a class absent from both maps). JSON
# has no NaN: they are written as null and read back as NaN. Infinities (the ends of a calibration
# sweep's gamma grid) are written as the strings "Infinity" / "-Infinity" and read back as floats.
_NAN_KEYS = ("miou_old", "miou_new", "miou_all", "iou", "forgetting", "miou_s", "miou_u", "ausuc")
_INFINITIES = {"Infinity": float("inf"), "-Infinity": float("-inf")}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        if obj != obj:
            return None
        return obj if abs(obj) != float("inf") else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _nan_back(obj: Any, key: str = "") -> Any:
    if obj is None and key in _NAN_KEYS:
        return float("nan")
    if isinstance(obj, str) and obj in _INFINITIES:
        return _INFINITIES[obj]
    if isinstance(obj, dict):
        return {k: _nan_back(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_back(v, key) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (NaN and infinities written as null), readable by any JSON reader."""
    return json.dumps(_json_safe(obj), allow_nan=False, **kw)


def loads(text: str) -> Any:
    """JSON written by ``dumps`` (or by older runs, with bare NaN), the figures' nulls as NaN."""
    return _nan_back(json.loads(text))


def kept_wall_time(rows: list[dict]) -> float:
    """The wall time of results.jsonl rows, in file order. A row's run_wall_time_s counts from the
    run's first invocation; rows written before that key existed only have wall_time_s, counted from
    the start of their own invocation, so a drop in it marks a resumption."""
    done, current = 0.0, 0.0
    for r in rows:
        if r.get("run_wall_time_s") is not None:
            done, current = float(r["run_wall_time_s"]), 0.0
        elif r.get("wall_time_s") is not None:
            w = float(r["wall_time_s"])
            if w < current:
                done += current
            current = w
    return done + current
