import ast
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

import ciss.engine
import ciss.engine.base_cache
from ciss.engine import TrainingDiverged, train
from ciss.methods import METHODS, Method, list_methods
from ciss.results import RunDir, kept_wall_time, load_checkpoint


def test_engine_never_names_a_method():
    sources = sorted(Path(ciss.engine.__file__).parent.glob("*.py"))
    assert len(sources) > 1, "ciss.engine is a package of modules"
    names = set(list_methods()) | {cls.__name__ for cls in METHODS.values()}
    found = set()
    for node in (n for src in sources for n in ast.walk(ast.parse(src.read_text()))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.add(node.value)
        if isinstance(node, ast.Name) and node.id in names:
            found.add(node.id)
        if isinstance(node, ast.Attribute) and node.attr in names:
            found.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ciss.methods."):
            found.add(node.module)
    assert not found, f"the engine mentions methods: {found}"


def test_two_step_run_writes_results_and_checkpoints(tiny_cfg):
    res = train(tiny_cfg())
    rows = [json.loads(l) for l in (res.run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert len(rows[0]["iou"]) == 5 and len(rows[1]["iou"]) == 7  # 4+bg, then +2
    for r in rows:
        assert 0.0 <= r["miou_all"] <= 1.0
    assert (res.run_dir / "ckpt" / "step-1.pt").is_file()
    assert not (res.run_dir / "ckpt" / "last.pt").exists()
    state = load_checkpoint(res.run_dir / "ckpt" / "step-1.pt")
    assert state["model_config"]["classes_per_step"] == [5, 2]
    assert (res.run_dir / "config.yaml").is_file() and (res.run_dir / "meta.json").is_file()
    meta = json.loads((res.run_dir / "meta.json").read_text())  # what a bit-identical retrain needs
    assert meta["threads"] == torch.get_num_threads()
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    losses = [json.loads(l) for l in (res.run_dir / "losses.jsonl").read_text().splitlines()]
    assert {r["step"] for r in losses} == {0, 1} and all("ce" in r for r in losses)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    f0 = rows[0]["iou"][0] - rows[1]["iou"][0]  # background: learned at step 0
    assert summary["forgetting"][0] == pytest.approx(f0)
    assert summary["forgetting"][5] == pytest.approx(0.0) or summary["forgetting"][5] is None


@dataclass
class _Exploding(Method):
    """Test-only: NaN loss at step 1."""

    name = "_exploding"

    def loss(self, out, targets, old, batch, ctx):
        terms = super().loss(out, targets, old, batch, ctx)
        if ctx.step == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


@dataclass
class _Crashing(Method):
    """Test-only: dies in the second epoch of step 1, like a killed job."""

    name = "_crashing"
    armed = True
    calls = 0

    def loss(self, out, targets, old, batch, ctx):
        if ctx.step == 1 and _Crashing.armed:
            _Crashing.calls += 1
            if _Crashing.calls > ctx.iters_per_epoch:
                raise KeyboardInterrupt
        return super().loss(out, targets, old, batch, ctx)


@pytest.fixture
def extra_methods(monkeypatch):
    monkeypatch.setitem(METHODS, "_exploding", _Exploding)
    monkeypatch.setitem(METHODS, "_crashing", _Crashing)
    monkeypatch.setattr(_Crashing, "armed", True)
    monkeypatch.setattr(_Crashing, "calls", 0)


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tiny_cfg, extra_methods):
    cfg = tiny_cfg("method=_exploding")
    with pytest.raises(TrainingDiverged, match=r"step 1 diverged .*--set optim.lr_next=0.001\b"):
        train(cfg)  # the tiny recipe's lr_next is 0.01
    run = Path(cfg.out_dir)
    ckpt = next(run.glob("*/ckpt/step-0.pt"))
    assert load_checkpoint(ckpt)["step"] == 0
    assert not list(run.glob("*/ckpt/last.pt"))  # no partial checkpoint of the diverging step


def test_a_blow_up_is_caught_before_anything_is_saved_and_a_lower_lr_resumes(tiny_cfg, capsys):
    from ciss.cli import main

    args = ["train", "--recipe", "tiny"]
    sets = [a for s in ("data.dataset=synthetic", "data.task=4-2", "data.crop_size=32",
                        "data.options={num_classes: 6, size: 32, length: 24}", "optim.epochs=2",
                        f"out_dir={tiny_cfg().out_dir}", f"cache_dir={tiny_cfg().cache_dir}",
                        "name=blowup", "progress=false", "tensorboard=false") for a in ("--set", s)]
    assert main([*args, *sets, "--set", "optim.lr=1e6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ciss: error: step 0 diverged") and "--set optim.lr=100000" in err
    run = Path(tiny_cfg().out_dir) / "blowup"
    assert not list((run / "ckpt").glob("*.pt"))  # nothing saved as good
    assert not list(Path(tiny_cfg().cache_dir).rglob("*.pt"))  # nor cached as a shared step 0
    assert main([*args, *sets, "--set", "optim.lr=0.05"]) == 0  # the lowered lr is accepted
    meta = json.loads((run / "meta.json").read_text())
    assert meta["changes"] == [{"key": "optim.lr", "from": 1e6, "to": 0.05, "from_step": 0}]
    with pytest.raises(ValueError, match="step 0, which is finished"):
        train(tiny_cfg("name=blowup", "optim.epochs=2", "optim.lr=0.01"))


def test_resume_continues_from_last_epoch(tiny_cfg, extra_methods):
    cfg = tiny_cfg("method=_crashing", "optim.epochs_next=3", "name=resume")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = Path(cfg.out_dir) / "resume"
    assert load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 0
    _Crashing.armed = False  # the same command again, now without the crash
    res = train(cfg)
    losses = [json.loads(l) for l in (run / "losses.jsonl").read_text().splitlines()]
    epochs = [(r["step"], r["epoch"]) for r in losses]
    # step 0 trained once; step 1 epoch 0 from the first run, epochs 1-2 from the resumed run
    assert epochs == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert [s.step for s in res.steps] == [0, 1]


def test_a_resumed_run_counts_the_time_of_the_work_it_kept(tiny_cfg, extra_methods):
    cfg = tiny_cfg("method=_crashing", "optim.epochs_next=3", "name=clock")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = Path(cfg.out_dir) / "clock"
    kept = load_checkpoint(run / "ckpt" / "last.pt")["run_wall_time_s"]  # step 0 and one epoch
    step0 = json.loads((run / "results.jsonl").read_text().splitlines()[0])["run_wall_time_s"]
    assert 0 < step0 < kept
    _Crashing.armed = False
    train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    # this invocation's time plus what the first one kept, not this invocation's alone
    assert kept <= summary["run_wall_time_s"] - summary["wall_time_s"] < kept + 5
    assert RunDir(run, create=False).kept_wall_time() == pytest.approx(summary["run_wall_time_s"], abs=1)


def test_kept_wall_time_reads_rows_written_before_it_was_recorded():
    # rows of a run resumed in step 3: wall_time_s restarts with each invocation
    old = [{"step": t, "wall_time_s": w} for t, w in enumerate([590, 726, 850, 95, 179])]
    assert kept_wall_time(old) == 850 + 179
    assert kept_wall_time(old + [{"step": 5, "wall_time_s": 20, "run_wall_time_s": 1050}]) == 1050
    assert kept_wall_time([]) == 0


def test_finished_run_is_not_retrained(tiny_cfg):
    cfg = tiny_cfg("name=again")
    first = train(cfg)
    before = (first.run_dir / "losses.jsonl").read_text()
    second = train(cfg)
    assert (second.run_dir / "losses.jsonl").read_text() == before
    assert [s.miou_all for s in second.steps] == pytest.approx([s.miou_all for s in first.steps], nan_ok=True)


def test_step0_checkpoint_is_shared_between_runs(tiny_cfg):
    a = train(tiny_cfg("name=a"))
    b = train(tiny_cfg("name=b", "optim.lr_next=0.02"))
    sa = load_checkpoint(a.run_dir / "ckpt" / "step-0.pt")["model"]
    sb = load_checkpoint(b.run_dir / "ckpt" / "step-0.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    losses_b = [json.loads(l) for l in (b.run_dir / "losses.jsonl").read_text().splitlines()]
    assert all(r["step"] == 1 for r in losses_b), "run b retrained step 0"
    c = train(tiny_cfg("name=c", "seed=1"))  # another seed is another base step
    losses_c = [json.loads(l) for l in (c.run_dir / "losses.jsonl").read_text().splitlines()]
    assert any(r["step"] == 0 for r in losses_c)


def test_a_run_waits_for_another_training_the_same_base_step(tiny_cfg, tmp_path, monkeypatch):
    """While another process holds a base step's lock, a run waits, then loads what it wrote."""
    import shutil
    import threading

    from ciss.results import exclusive

    a = train(tiny_cfg("name=a"))
    (base,) = (tmp_path / "cache" / "base").glob("*.pt")
    shutil.move(base, tmp_path / "kept.pt")
    waited = threading.Event()
    real = ciss.engine.base_cache.exclusive
    def watched(path, on_wait=None, wait=True):
        return real(path, on_wait=lambda: (on_wait and on_wait(), waited.set()), wait=wait)

    monkeypatch.setattr(ciss.engine.base_cache, "exclusive", watched)
    runs = []
    with exclusive(base.with_suffix(".lock")):  # "another process" is training this base step
        t = threading.Thread(target=lambda: runs.append(train(tiny_cfg("name=b"))))
        t.start()
        assert waited.wait(120), "the run did not wait for the lock"
        shutil.move(tmp_path / "kept.pt", base)  # ... and writes it before letting go
    t.join(120)
    losses_b = [json.loads(l) for l in (runs[0].run_dir / "losses.jsonl").read_text().splitlines()]
    assert losses_b and all(r["step"] == 1 for r in losses_b), "run b trained the base step itself"
    sa = load_checkpoint(a.run_dir / "ckpt" / "step-0.pt")["model"]
    sb = load_checkpoint(runs[0].run_dir / "ckpt" / "step-0.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_being_trained_elsewhere_is_refused(tiny_cfg, tmp_path):
    from ciss.config import ConfigError
    from ciss.results import exclusive

    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    with exclusive(run_dir / ".lock"), pytest.raises(ConfigError, match="another process"):
        train(tiny_cfg("name=busy"))
    assert not (run_dir / "results.jsonl").exists()
    assert len(train(tiny_cfg("name=busy")).steps) == 2  # free again once the holder lets go


def test_joint_trains_one_step_on_all_classes(tiny_cfg):
    res = train(tiny_cfg("method=joint"))
    assert len(res.steps) == 1
    assert len(res.steps[0].iou) == 7 and res.steps[0].num_base == 5


def test_tensorboard_receives_every_loss_term_and_metric(tiny_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(tiny_cfg("tensorboard=true", "name=tb"))
    acc = EventAccumulator(str(res.run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step0/train/loss", "step0/train/ce", "step1/train/ce", "eval/miou_all", "eval/miou_old",
            "eval/miou_new"} <= tags


def test_a_run_directory_of_another_experiment_is_not_resumed(tiny_cfg):
    train(tiny_cfg("name=same"))
    with pytest.raises(ValueError, match="another configuration.*optim.momentum"):
        train(tiny_cfg("name=same", "optim.momentum=0.5"))
    with pytest.raises(ValueError, match="optim.lr is the lr of step 0, which is finished"):
        train(tiny_cfg("name=same", "optim.lr=0.5"))
    train(tiny_cfg("name=same", "progress=true"))  # cosmetic keys may change


@pytest.mark.parametrize("method", ["ft", "mib"])
def test_bf16_autocast_run(tiny_cfg, method):
    from ciss.engine import autocast_ctx

    with autocast_ctx(torch.device("cpu"), "bf16"):
        y = torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
    assert y.dtype == torch.bfloat16
    res = train(tiny_cfg("optim.amp=bf16", f"method={method}", f"name=amp-{method}"))
    assert all(0.0 <= s.miou_all <= 1.0 for s in res.steps)
    with pytest.raises(ValueError, match="bf16"):
        autocast_ctx(torch.device("cpu"), "fp8")


def test_domain_incremental_cityscapes_run(tmp_path, tiny_cfg):
    from test_data_loaders import _cityscapes  # the loader tests' fixture writer

    root = _cityscapes(tmp_path / "cs", per_city=3)
    cfg = tiny_cfg("data.dataset=cityscapes", f"data.root={root}", "data.task=11-5",
                   "data.train_split=trainval", "data.test_split=null", "data.options={}",
                   "name=domains")
    res = train(cfg)
    assert [s.step for s in res.steps] == [0, 1, 2]
    assert all(len(s.iou) == 19 for s in res.steps)  # no class is added, every step sees 19
    state = load_checkpoint(res.run_dir / "ckpt" / "step-2.pt")
    assert state["model_config"]["classes_per_step"] == [19]


@pytest.mark.parametrize("channels_last", [True, False])
def test_models_take_the_configured_memory_layout(tiny_cfg, channels_last):
    from ciss.engine import Experiment

    exp = Experiment(tiny_cfg(f"channels_last={str(channels_last).lower()}"))
    model = exp.build_model((4,))
    convs = [m.weight for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1 and m.weight.shape[1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last
                         for w in convs)


def test_a_run_does_not_resume_on_other_data(tmp_path, tiny_cfg):
    # the same command, but a label file of the folder was edited in between
    from test_data_folder import write_folder

    root = write_folder(tmp_path / "folder", n=6, size=(32, 32), ext=".png")
    args = ("data.dataset=folder", f"data.root={root}", "data.task=1-1", "data.options={}", "name=data")
    first = train(tiny_cfg(*args, "optim.epochs=1"))
    meta = json.loads((first.run_dir / "meta.json").read_text())
    assert set(meta["data"]) == {"train", "test"} and meta["data"]["train"] and meta["data"]["test"]
    (first.run_dir / "summary.json").unlink()  # as if it had stopped before its end
    label = np.zeros((32, 32), np.uint8)
    label[:4] = 2
    Image.fromarray(label, mode="L").save(root / "labels" / "000.png")
    with pytest.raises(ValueError, match="trained on other train data"):
        train(tiny_cfg(*args, "optim.epochs=1"))


def test_a_shared_step_0_is_evaluated_once(tiny_cfg, monkeypatch):
    from ciss.engine.evaluator import StepEvaluator

    first = train(tiny_cfg("name=a", "method=ft"))
    kept = list(Path(tiny_cfg().cache_dir).rglob("*.eval-*.json"))
    assert len(kept) == 1
    evaluated = []
    real = StepEvaluator._evaluate
    monkeypatch.setattr(StepEvaluator, "_evaluate",
                        lambda self, model, step, *a: evaluated.append(step) or real(self, model, step, *a))
    second = train(tiny_cfg("name=b", "method=lwf"))  # same base step, read from the cache
    assert evaluated == [1]  # step 0's figures were read back, not computed again
    assert second.steps[0].iou == first.steps[0].iou
    # the same checkpoint evaluated at another size is evaluated on its own
    train(tiny_cfg("name=c", "method=lwf", "data.eval_size=24"))
    assert evaluated == [1, 0, 1] and len(list(Path(tiny_cfg().cache_dir).rglob("*.eval-*.json"))) == 2
