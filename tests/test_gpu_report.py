"""scripts/gpu_report.py, the GPU check, on the CPU: a section's processes end with it, a section that cannot run
here says so, and only a failure fails the check. (The whole check is rehearsed with ../shared/gpu/rehearse.sh.)"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_report.py"


@pytest.fixture(scope="module")
def report_module():
    """The script as a module (it puts the source tree on PYTHONPATH when imported: undone after)."""
    saved_path, saved_env = list(sys.path), os.environ.get("PYTHONPATH")
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = sys.modules["gpu_report"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_report"]
    sys.path[:] = saved_path
    if saved_env is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved_env


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# a section that starts a child (as pytest or DataLoader workers are), says so, then runs on or ends at once
SECTION = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("runs_for", "code"), [(120, None), (0, 0)])
def test_a_section_ends_with_every_process_it_started(report_module, tmp_path: Path, runs_for: int, code) -> None:
    """Past its bound, or ended with a child still running: the section's whole process group ends, not only its
    own process (a plain subprocess timeout left the tests section's pytest building pipelines into the next)."""
    log = tmp_path / "section.log"
    started = time.monotonic()
    assert report_module.run_bounded([sys.executable, "-c", SECTION, str(runs_for)], log, limit=4) == code
    assert time.monotonic() - started < 4 + report_module.GRACE_S + 5
    child = int(log.read_text().split()[0])
    deadline = time.monotonic() + 2
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


def test_the_peers_section_is_skipped_when_no_peer_loads(report_module, tmp_path: Path, monkeypatch) -> None:
    """Without the peer wheels (the fourth piece did not travel): skipped with the reasons, not a KeyError."""
    monkeypatch.setattr("dali_skd.data.peers.peer_problem", lambda name: "not installed: pip install -e '.[peers]'")
    args = argparse.Namespace(data=tmp_path, out=tmp_path, device="cuda", quick=False, limit=90.0)
    result = report_module.section_peers(args)
    assert result["status"].startswith("skipped: no peer loader loads here (decord: not installed")
    assert set(result["skipped"]) == {"decord", "pyav", "torchcodec"}


def test_a_sweep_way_whose_process_fails_fails_its_rows(report_module, tmp_path: Path, monkeypatch) -> None:
    """A way that sets DALI's environment runs in a process of its own: should it die, its rows say so (not "no
    time left"), and the sweep fails."""
    unknown = report_module.Variant("unknown", "a way its own process does not know", env=lambda most: {"X": "1"})
    monkeypatch.setattr(report_module, "SWEEP", (unknown,))
    args = argparse.Namespace(data=tmp_path, out=tmp_path, device="cpu", quick=True, limit=15.0)
    result = report_module.section_sweep(args)
    sets = ["fpj4", "fpj8", "fpj16", *report_module.JPEG_VARIANTS]  # the first way's: the JPEG variants too
    assert [(r["data"], r["error"]) for r in result["rows"]] == [(name, "exit 1") for name in sets]
    assert result["status"] == f"failed: {', '.join(f'unknown {name}' for name in sets)} (sweep.log)"
    assert result["not_run"] == ["host fpj8: no time left"]
    assert "unknown: a way its own process does not know" in report_module._sweep_lines(result)


@pytest.mark.slow
def test_the_tests_section_without_a_gpu_is_skipped_not_failed(report_module, tmp_path: Path) -> None:
    """The GPU tests on a machine without one: every one skips itself, so the section says skipped, and why."""
    args = argparse.Namespace(data=tmp_path, out=tmp_path, device="cpu", quick=True)
    entry = report_module.run_section("tests", args, limit=300)
    assert entry["status"] == "skipped: needs a CUDA GPU", entry.get("log_tail")
    result = entry["result"]
    assert result["tests"] == result["skipped"] >= 7 and result["failures"] == result["errors"] == 0
    lines = report_module.table({"machine": report_module.machine(), "sections": {"tests": entry}})
    assert "-- tests: skipped: needs a CUDA GPU" in lines and f"{result['tests']} tests: 0 failed" in lines


def test_only_a_failed_section_fails_the_check(report_module, tmp_path: Path, monkeypatch) -> None:
    statuses = {"parity": "ok", "tests": "skipped: needs a CUDA GPU", "sweep": "ok", "train": "ok",
                "dataloader": "ok", "peers": "skipped: no peer loader loads here (...)"}  # fmt: skip
    for name in [*(f"fpj{n}" for n in report_module.FRAMES_PER_JPEG), *report_module.JPEG_VARIANTS]:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "manifest.json").write_text("{}")
    monkeypatch.setattr(report_module, "run_section", lambda name, args, limit: {"status": statuses[name]})
    args = argparse.Namespace(data=tmp_path / "data", out=tmp_path / "out", device="cpu", quick=True)
    report_module.run_all(args)  # no exit: nothing failed
    statuses["sweep"] = "failed: full fpj4 (sweep.log)"
    with pytest.raises(SystemExit, match="the GPU check failed: sweep"):
        report_module.run_all(args)


def test_the_check_is_one_command_with_a_usage(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "pass --prepare DIR, or --data DIR and --out OUT" in done.stderr
