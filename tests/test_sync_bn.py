"""SyncBN under DDP: 2 gloo processes hold the statistics of BN over their batches together."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ciss.config import load_config, to_dict
from ciss.engine.checkpoints import check_same_experiment
from ciss.models import build_segmenter
from ciss.results import RunDir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sync_bn_worker import layer_and_inputs  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_bn")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          str(HERE / "sync_bn_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_sync_bn_equals_bn_over_the_concatenated_batch(ranks):
    bn, x, w = layer_and_inputs()
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * w).sum().backward()
    r0, r1 = ranks[0]["layer"], ranks[1]["layer"]
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad, **tol)
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], bn.running_mean, **tol)
        torch.testing.assert_close(r["var"], bn.running_var, **tol)
        # DDP averages the processes' gradients: each holds half the gradient of the summed loss
        torch.testing.assert_close(2 * r["weight_grad"], bn.weight.grad, **tol)
        torch.testing.assert_close(2 * r["bias_grad"], bn.bias.grad, **tol)


def test_after_a_step_both_ranks_hold_the_same_bn_statistics_only_with_sync_bn(ranks):
    def stats(rank: int, sync: bool) -> dict[str, torch.Tensor]:
        return {k: v for k, v in ranks[rank][f"model_sync_{sync}"].items()
                if k.endswith(("running_mean", "running_var"))}

    on0, on1, off0, off1 = stats(0, True), stats(1, True), stats(0, False), stats(1, False)
    assert on0 and on0.keys() == off0.keys()
    for k in on0:
        torch.testing.assert_close(on0[k], on1[k], atol=1e-6, rtol=1e-6)
    assert max(float((off0[k] - off1[k]).abs().max()) for k in off0) > 1e-2
    assert ranks[0]["types_sync_True"] == ["SyncBatchNorm2d"]
    assert ranks[0]["types_sync_False"] == ["BatchNorm2d"]
    # a checkpoint of a SyncBN model has plain BN keys: it loads strictly into a plain model
    plain = build_segmenter("tiny", head_channels=8, classes_per_step=(3,))
    plain.load_state_dict(ranks[0]["model_sync_True"], strict=True)


def test_sync_bn_is_a_config_key_that_a_resume_may_change(tmp_path):
    """On by default; a run directory made before the key existed resumes under either value."""
    assert load_config(None, []).sync_bn is True
    assert load_config(None, ["sync_bn=false"]).sync_bn is False
    run = RunDir(tmp_path / "run")
    old = to_dict(load_config(None, []))
    del old["sync_bn"]
    run.write_config(old)
    (run.path / "ckpt").mkdir(exist_ok=True)
    (run.path / "ckpt" / "step-0.pt").write_bytes(b"")
    assert check_same_experiment(run, load_config(None, [])) == []
