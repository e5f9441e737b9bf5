"""The parts of benchmarks/gpu_check.sh that run in Python; each writes one JSON file of figures.

    python benchmarks/gpu_check.py amp OUT.json          # bf16 and fp16 autocast steps vs float32
    torchrun --nproc_per_node 1 benchmarks/gpu_check.py nccl OUT.json   # NCCL, DDP, SyncBN on CUDA
    python benchmarks/gpu_check.py throughput OUT.json   # resnet101 crop 512: engine vs bare
    python benchmarks/gpu_check.py report DIR OUT.md --command "..."     # the markdown page

Every part but `report` needs a CUDA device and says so without one. `--smoke` runs a part at toy
size on the CPU (gloo instead of NCCL), to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ciss` does; before torch is imported
import torch

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # run directories and the scenario cache
# The sizes of the check; --smoke swaps in toy ones that a CPU runs in seconds.
SIZE = {"device": "cuda", "crop": 512, "amp_backbone": "efficientnet_lite0", "amp_batch": 8,
        "amp_batches": 6, "backbone": "resnet101", "batch": 16, "batches": 20, "images": 400}
SMOKE = {"device": "cpu", "crop": 32, "amp_backbone": "tiny", "amp_batch": 2, "amp_batches": 2,
         "backbone": "tiny", "batch": 2, "batches": 2, "images": 40}


def need_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: needs a CUDA device (torch.cuda.is_available() is False)")


def _sync() -> None:
    if SIZE["device"] == "cuda":
        torch.cuda.synchronize()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if SIZE["device"] == "cuda" else float("nan")


def _reset_peak() -> None:
    if SIZE["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _experiment(sets: list[str]):
    from ciss.config import load_config
    from ciss.engine import Experiment

    cfg = load_config(None, [
        "data.dataset=synthetic", "data.task=15-1", "model.pretrained=false", f"device={SIZE['device']}",
        f"data.crop_size={SIZE['crop']}", f"data.options={{num_classes: 20, size: {SIZE['crop']}, "
        f"length: {SIZE['images']}}}", f"out_dir={TMP}", f"cache_dir={TMP / 'cache'}", "progress=false",
        "tensorboard=false", *sets], recipe="paper")
    return Experiment(cfg)


class _Held(torch.utils.data.Dataset):
    """Items generated once and kept in memory: the loop then times the engine, not the generator."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _images(exp, n: int, held: bool):
    from ciss.data.transforms import Resized, TrainTransform

    cfg = exp.cfg
    data = exp.train_scenario.train_dataset(0, Resized(TrainTransform(cfg.data.crop_size), cfg.data.resize))
    subset = torch.utils.data.Subset(data, list(range(n)))
    return _Held([subset[i] for i in range(n)]) if held else subset


def _engine_phase(exp, model, images, epochs: int) -> tuple[float, list[dict[str, float]]]:
    """The engine's training loop (ciss.engine.loop) over `images`, without checkpoint writes:
    seconds taken and the mean loss terms of each epoch."""
    from ciss.engine.loop import train_phase
    from ciss.methods import Phase

    cfg = exp.cfg
    loader = exp.loader(images, cfg.optim.batch_size, train=True)
    ctx = exp.context(0, epochs, len(loader))
    means: list[dict[str, float]] = []
    _sync()
    t0 = time.perf_counter()
    train_phase(model, None, loader, ctx, Phase("train", epochs), 0, cfg.optim.lr, None,
                method=exp.method, optim=cfg.optim, device=exp.device, show_progress=False,
                last_ckpt=exp.run.path / "unused.pt", seed=cfg.seed,
                epoch_done=lambda _i, _p, _e, m, _o, _s: means.append(m))
    _sync()
    return time.perf_counter() - t0, means


def amp(out: Path) -> None:
    """A few training steps of the default model (EfficientNet-Lite0 DeepLabV3, crop 512) in float32,
    bf16 and fp16 autocast (fp16 with the engine's loss scaling), from the same weights and batches."""
    rows = {}
    batch, batches = SIZE["amp_batch"], SIZE["amp_batches"]
    images = None
    for mode in ("none", "bf16", "fp16"):
        exp = _experiment([f"optim.amp={mode}", f"optim.batch_size={batch}",
                           f"model.backbone={SIZE['amp_backbone']}"])
        torch.manual_seed(0)
        model = exp.build_model((exp.train_scenario.classes_per_step[0],)).to(exp.device)
        if images is None:  # the same batches for every mode
            images = _images(exp, batches * batch, held=True)
        _reset_peak()
        seconds, means = _engine_phase(exp, model, images, epochs=2)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        rows[mode] = {"loss_epochs": [m["loss"] for m in means], "weights_finite": finite,
                      "images_per_s": 2 * len(images) / seconds, "peak_memory_gb": _peak_gb()}
    ref = rows["none"]["loss_epochs"]
    for mode in ("bf16", "fp16"):
        rows[mode]["max_rel_diff_vs_fp32"] = max(abs(a - b) / max(abs(b), 1e-8)
                                                 for a, b in zip(rows[mode]["loss_epochs"], ref))
    out.write_text(json.dumps({"backbone": SIZE["amp_backbone"], "crop": SIZE["crop"], "batch": batch,
                               "batches": batches, "epochs": 2, "modes": rows}, indent=1))


def nccl(out: Path) -> None:
    """Under torchrun: an NCCL process group, an all-reduce, SyncBN's all-reduce path against
    BatchNorm (float32 and bf16 autocast), and a few DDP steps of a tiny segmenter with SyncBN."""
    import torch.distributed as dist
    from torch.nn import functional as F

    from ciss.engine.distributed import wrap_ddp
    from ciss.engine.sync_bn import SyncBatchNorm2d
    from ciss.models import build_segmenter

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = SIZE["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    t = torch.full((4,), float(dist.get_rank() + 1), device=dev)
    dist.all_reduce(t)
    world = dist.get_world_size()
    res: dict[str, Any] = {"backend": dist.get_backend(), "world": world,
                           "all_reduce_ok": bool(t.eq(world * (world + 1) / 2).all())}
    bn = SyncBatchNorm2d(16).to(dev).train()
    x = torch.randn(4, 16, 32, 32, device=dev) * 3 + 1
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        xin = x.to(dtype) if dtype else x
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = bn.synchronised(xin)
        # against BatchNorm in float32 on the same (rounded) input; a bf16 output is rounded too
        ref = F.batch_norm(xin.float(), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        res[f"sync_bn_max_abs_diff_{name}"] = float((y.detach().float() - ref.detach()).abs().max())
    model = build_segmenter("tiny", head_channels=16, classes_per_step=(4,)).to(dev)
    ddp = wrap_ddp(model, dev, sync_bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ddp(torch.randn(4, 3, 64, 64, device=dev)).logits.square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    res["ddp_losses"] = losses
    dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(res, indent=1))


def throughput(out: Path, amp_mode: str = "bf16") -> None:
    """resnet101 DeepLabV3 at crop 512 (the papers' model, random weights): images/s of a bare
    forward+backward+SGD step on batches already on the GPU, of the engine's loop on images held in
    memory (its loader, host-to-device copies, method hooks, loss bookkeeping), and of the engine's
    loop with synthetic images generated by the loader's workers."""
    from ciss.engine import autocast_ctx, collate

    workers = min(12, os.cpu_count() or 1) if SIZE["device"] == "cuda" else 0
    batch, batches = SIZE["batch"], SIZE["batches"]
    exp = _experiment([f"model.backbone={SIZE['backbone']}", f"optim.batch_size={batch}",
                       f"optim.amp={amp_mode}", f"data.num_workers={workers}"])
    n = batch * batches
    held = _images(exp, n, held=True)
    model = exp.build_model((exp.train_scenario.classes_per_step[0],)).to(exp.device).train()

    gpu = [collate([held[i] for i in range(b * batch, (b + 1) * batch)]) for b in range(batches)]
    gpu = [(b.image.to(exp.device).contiguous(memory_format=torch.channels_last), b.label.to(exp.device))
           for b in gpu]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_mode == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)

    def bare(pairs) -> float:
        _sync()
        t0 = time.perf_counter()
        for image, label in pairs:
            opt.zero_grad(set_to_none=True)
            with autocast_ctx(exp.device, amp_mode):
                loss = loss_fn(model(image).logits, label)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        _sync()
        return time.perf_counter() - t0

    bare(gpu[:3])  # warm-up: cuDNN algorithms, allocator
    _reset_peak()
    bare_s = bare(gpu)
    peak = _peak_gb()
    _engine_phase(exp, model, torch.utils.data.Subset(held, range(min(n, 3 * batch))), epochs=1)  # warm-up
    held_s, _ = _engine_phase(exp, model, held, epochs=1)
    live_s, _ = _engine_phase(exp, model, _images(exp, n, held=False), epochs=1)
    out.write_text(json.dumps({
        "backbone": SIZE["backbone"], "crop": exp.cfg.data.crop_size, "batch": batch, "batches": batches,
        "amp": amp_mode, "workers": workers, "bare_images_per_s": n / bare_s,
        "engine_held_images_per_s": n / held_s, "engine_live_images_per_s": n / live_s,
        "engine_held_over_bare": bare_s / held_s, "engine_live_over_bare": bare_s / live_s,
        "bare_peak_memory_gb": peak}, indent=1))


def _read(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def report(folder: Path, out: Path, command: str) -> int:
    """gpu_check.md from the parts' JSON files (and the torchrun CLI run's files) in `folder`;
    returns 1 when a part is missing or failed its check."""
    env = _read(folder / "env.json") or {}
    lines = ["# GPU check", "", f"Command: `{command}`", "",
             f"Machine: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"git {env.get('git', '?')}, {env.get('date', '?')}.", ""]
    failed = []
    def part(name: str, title: str) -> Optional[dict]:
        """The part's JSON, after its section title; None (and a failure) when it did not finish."""
        found = _read(folder / f"{name}.json")
        lines.extend([f"## {title}", ""])
        if found is None:
            failed.append(name)
            lines.extend([f"Did not finish: see `{name}.log`.", ""])
        return found

    a = part("amp", "Autocast training steps")
    if a is not None:
        lines += [f"DeepLabV3 on {a['backbone']} (random weights), crop {a['crop']}, batch {a['batch']}, "
                  f"{a['batches']} batches x {a['epochs']} epochs through the engine's loop, same start.", "",
                  "| amp | mean loss per epoch | rel. diff vs fp32 | weights finite | images/s | peak GB |",
                  "|---|---|---|---|---|---|"]
        for mode, r in a["modes"].items():
            diff = r.get("max_rel_diff_vs_fp32")
            lines.append(f"| {mode} | {', '.join(f'{v:.4f}' for v in r['loss_epochs'])} | "
                         f"{'-' if diff is None else f'{diff:.4f}'} | {r['weights_finite']} | "
                         f"{r['images_per_s']:.1f} | {r['peak_memory_gb']:.2f} |")
            if not r["weights_finite"] or (diff is not None and diff > 0.1):
                failed.append(f"amp {mode}")
        lines.append("")
    n = part("nccl", "torchrun --nproc_per_node 1 (NCCL)")
    cli = folder / "cli" / "results.jsonl"
    if n is not None:
        ok = (n["all_reduce_ok"] and n["sync_bn_max_abs_diff_fp32"] < 1e-4
              and n["sync_bn_max_abs_diff_bf16"] < 0.05
              and all(v == v and abs(v) != float("inf") for v in n["ddp_losses"]))
        failed += [] if ok else ["nccl"]
        lines += [f"{n['backend']} process group of {n['world']}: all-reduce "
                  f"{'ok' if n['all_reduce_ok'] else 'WRONG'}; "
                  f"SyncBN's all-reduce path vs BatchNorm: max |diff| {n['sync_bn_max_abs_diff_fp32']:.2e} "
                  f"(fp32), {n['sync_bn_max_abs_diff_bf16']:.2e} (bf16 input); DDP + SyncBN steps of a tiny "
                  f"segmenter, losses {', '.join(f'{v:.4f}' for v in n['ddp_losses'])}.", ""]
    if cli.is_file():
        rows = [json.loads(l) for l in cli.read_text().splitlines() if l.strip()]
        lines += ["`ciss train` of a tiny scenario under torchrun on CUDA (bf16): "
                  + "; ".join(f"step {r['step']} mIoU all {100 * r['miou_all']:.2f}" for r in rows), ""]
    else:
        failed.append("torchrun ciss train")
        lines += ["`ciss train` under torchrun did not finish: see `cli.log`.", ""]
    t = part("throughput", "resnet101 crop 512 training throughput")
    if t is not None:
        lines += [f"DeepLabV3 {t['backbone']} (random weights), crop {t['crop']}, batch {t['batch']}, "
                  f"{t['amp']}, "
                  f"{t['batches']} batches; bare peak memory {t['bare_peak_memory_gb']:.1f} GB.", "",
                  "| what | images/s | vs bare |", "|---|---|---|",
                  "| bare forward+backward+step (batches on the GPU) | "
                  f"{t['bare_images_per_s']:.1f} | 1.00 |",
                  f"| engine loop, images in memory | {t['engine_held_images_per_s']:.1f} | "
                  f"{t['engine_held_over_bare']:.2f} |",
                  f"| engine loop, synthetic images made by {t['workers']} workers | "
                  f"{t['engine_live_images_per_s']:.1f} | {t['engine_live_over_bare']:.2f} |", ""]
    lines += ["Result: " + ("every check passed." if not failed else "FAILED: " + ", ".join(failed)), ""]
    out.write_text("\n".join(lines))
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["amp", "nccl", "throughput", "report"])
    ap.add_argument("paths", nargs="+", type=Path, help="OUT.json, or for report: DIR OUT.md")
    ap.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    ap.add_argument("--batch", type=int, default=SIZE["batch"], help="throughput: images per batch")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script only")
    args = ap.parse_args(argv)
    if args.part == "report":
        return report(args.paths[0], args.paths[1], args.command)
    SIZE.update(SMOKE if args.smoke else {"batch": args.batch})
    if not args.smoke:
        need_cuda()
    if args.part == "amp":
        amp(args.paths[0])
    elif args.part == "nccl":
        nccl(args.paths[0])
    else:
        throughput(args.paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
