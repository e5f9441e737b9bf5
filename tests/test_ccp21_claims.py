"""benchmarks/ccp21_claims.py: run names to claims, seeds to spreads, gaps to verdicts."""

import json
import statistics
from pathlib import Path

import pytest

from conftest import load_benchmark



@pytest.fixture(scope="module")
def claims():
    return load_benchmark("ccp21_claims")


def write_run(root: Path, name: str, miou_all: float) -> None:
    (root / name).mkdir(parents=True)
    steps = [{"step": 0, "miou_all": 0.5}, {"step": 1, "miou_all": miou_all}]
    (root / name / "summary.json").write_text(json.dumps({"steps": steps}))


def claim(claims, cid):
    return next(c for c in claims.CLAIMS if c.id == cid)


def test_names_seeds_and_variants_are_read(claims, tmp_path):
    write_run(tmp_path, "ccp21-15-1-overlapped-mib", 0.30)
    write_run(tmp_path, "ccp21-15-1-overlapped-mib-seed1", 0.32)
    write_run(tmp_path, "ccp21-15-1-overlapped-gsc-no_pr", 0.20)
    write_run(tmp_path, "ccp21-15-1-disjoint-ssul_m", 0.40)
    (tmp_path / "ccp21-15-1-overlapped-ft").mkdir()  # unfinished: no summary
    runs = claims.read_runs(tmp_path)
    assert runs[("15-1", "overlapped", "mib")] == pytest.approx({0: 30.0, 1: 32.0})
    assert runs[("15-1", "overlapped", "gsc-no_pr")] == pytest.approx({0: 20.0})
    assert runs[("15-1", "disjoint", "ssul_m")] == pytest.approx({0: 40.0})
    assert ("15-1", "overlapped", "ft") not in runs


def test_verdicts_follow_twice_the_standard_error(claims, tmp_path):
    for seed, (mib, ft) in enumerate([(30.0, 1.0), (31.0, 2.0)]):
        suffix = f"-seed{seed}" if seed else ""
        write_run(tmp_path, f"ccp21-15-1-overlapped-mib{suffix}", mib / 100)
        write_run(tmp_path, f"ccp21-15-1-overlapped-ft{suffix}", ft / 100)
        write_run(tmp_path, f"ccp21-15-1-overlapped-plop{suffix}", (mib + 0.5) / 100)
    runs = claims.read_runs(tmp_path)
    r = claims.verdict(claim(claims, "mib>ft-ove"), runs)
    s = statistics.stdev([30.0, 31.0])
    assert r["a_mean"] == pytest.approx(30.5) and r["b_mean"] == pytest.approx(1.5)
    assert r["se"] == pytest.approx((s ** 2 / 2 + s ** 2 / 2) ** 0.5) and r["verdict"] == "holds"
    assert claims.verdict(claim(claims, "plop>mib-ove"), runs)["verdict"] == "within noise"  # 0.5 < 2 se
    gsc = claims.verdict(claim(claims, "gsc>plop-ove"), runs)
    assert gsc["verdict"] == "not measured" and gsc["a_mean"] is None
    write_run(tmp_path, "ccp21-15-1-overlapped-gsc", 0.10)  # one seed: borrows the median spread
    r = claims.verdict(claim(claims, "gsc>plop-ove"), claims.read_runs(tmp_path))
    assert r["verdict"] == "fails" and "median" in r["spread"]


def test_joint_is_compared_with_the_best_other_method_and_one_seed_has_no_verdict(claims, tmp_path):
    write_run(tmp_path, "ccp21-15-1-disjoint-joint", 0.40)
    write_run(tmp_path, "ccp21-15-1-disjoint-mib", 0.35)
    write_run(tmp_path, "ccp21-15-1-disjoint-ft", 0.05)
    write_run(tmp_path, "ccp21-15-1-disjoint-gsc-no_sg", 0.50)  # a variant is not a method
    r = claims.verdict(claim(claims, "joint>all-dis"), claims.read_runs(tmp_path))
    assert r["b"] == "mib" and r["verdict"] == "points the paper's way (one seed, no spread)"


def test_the_page_lists_every_claim_and_the_given_reasons(claims, tmp_path):
    write_run(tmp_path, "ccp21-15-1-overlapped-lwf_mc", 0.01)
    write_run(tmp_path, "ccp21-15-1-overlapped-lwf", 0.02)
    text = claims.page(tmp_path, {"lwf_mc>lwf-ove": "its KD is over all classes"})
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| id")]
    assert len(rows) == len(claims.CLAIMS) and len({c.id for c in claims.CLAIMS}) == len(claims.CLAIMS)
    assert "its KD is over all classes" in next(r for r in rows if r.startswith("| lwf_mc>lwf-ove"))
