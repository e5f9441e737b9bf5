"""benchmarks/gpu_check.sh: refuses clearly without CUDA; its Python parts run at toy size on a CPU."""

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    return load_benchmark("gpu_check")


def test_the_script_parses_and_needs_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would run for minutes")
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "gpu_check.md")})
    assert res.returncode == 2 and "needs a CUDA device" in res.stderr
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.filterwarnings("ignore:optim.amp=fp16 needs CUDA")
def test_each_part_runs_at_toy_size_and_the_report_reads_them(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "SIZE", {**mod.SIZE, **mod.SMOKE})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    mod.amp(tmp_path / "amp.json")
    mod.nccl(tmp_path / "nccl.json")
    mod.throughput(tmp_path / "throughput.json")
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "results.jsonl").write_text(json.dumps({"step": 0, "miou_all": 0.5}) + "\n")
    assert mod.report(tmp_path, tmp_path / "gpu_check.md", "bash benchmarks/gpu_check.sh") == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "every check passed" in text and "images/s" in text and "| fp16 |" in text
    assert "gloo process group of 1: all-reduce ok" in text
    (tmp_path / "throughput.json").unlink()
    assert mod.report(tmp_path, tmp_path / "gpu_check.md", "x") == 1
    assert "FAILED: throughput" in (tmp_path / "gpu_check.md").read_text()
