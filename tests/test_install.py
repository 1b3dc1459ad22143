"""What an install picks: NVIDIA DALI's wheel for the driver's CUDA (an extra each), checked at start on a GPU
machine with the versions mocked; an optional package that is not installed is one line naming its extra."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from clickit import invoke

import cli
from dali_skd import runtime
from dali_skd.runtime import DALI_WHEELS, compare_dali_cuda, resolve_device

REPO = Path(__file__).resolve().parents[1]
CUDA13_WHEEL = {"nvidia-dali-cuda130": 13}
CUDA12_WHEEL = {"nvidia-dali-cuda120": 12}


def test_a_cuda12_driver_with_the_cuda13_wheel_is_told_to_install_the_cuda12_one() -> None:
    found = compare_dali_cuda((12, 4), CUDA13_WHEEL)
    assert found is not None and found.fatal
    assert found.message == (
        "NVIDIA DALI here is nvidia-dali-cuda130, built for CUDA 13, and the NVIDIA driver runs CUDA 12.4 at most: "
        "DALI's GPU pipeline cannot run. Install the build for CUDA 12: pip uninstall -y nvidia-dali-cuda130, then "
        "pip install nvidia-dali-cuda120 (the extra cuda12); or update the driver to one for CUDA 13; or run on the "
        "CPU (--device cpu)"
    )


def test_a_cuda13_driver_with_the_cuda12_wheel_runs_and_is_told_of_the_cuda13_one() -> None:
    found = compare_dali_cuda((13, 0), CUDA12_WHEEL)
    assert found is not None and not found.fatal  # a driver runs what was built for an older CUDA
    assert found.message == (
        "NVIDIA DALI here is nvidia-dali-cuda120, built for CUDA 12; the NVIDIA driver runs CUDA 13.0, which runs it "
        "too. The build for this driver: pip uninstall -y nvidia-dali-cuda120, then pip install nvidia-dali-cuda130 "
        "(the extra cuda13)"
    )


def test_the_other_cases_of_the_cuda_check() -> None:
    assert compare_dali_cuda((13, 0), CUDA13_WHEEL) is None
    assert compare_dali_cuda((12, 8), CUDA12_WHEEL) is None
    assert compare_dali_cuda((14, 1), CUDA13_WHEEL) is None  # a newer driver, and the newest build there is
    assert compare_dali_cuda(None, CUDA13_WHEEL) is None  # no driver: the CPU path runs either wheel
    assert compare_dali_cuda((12, 4), {}) is None  # no wheel: importing DALI names the extra
    old = compare_dali_cuda((11, 8), CUDA12_WHEEL)
    assert old is not None and old.fatal and "runs CUDA 11.8 at most" in old.message and "--device cpu" in old.message
    both = compare_dali_cuda((12, 2), {**CUDA12_WHEEL, **CUDA13_WHEEL})
    assert both is not None and both.fatal
    assert "pip uninstall -y nvidia-dali-cuda120 nvidia-dali-cuda130, then pip install nvidia-dali-cuda120" in (
        both.message
    )
    nightly = compare_dali_cuda((12, 4), {"nvidia-dali-nightly-cuda130": 13})
    assert nightly is not None and nightly.fatal and "pip uninstall -y nvidia-dali-nightly-cuda130" in nightly.message


@pytest.fixture
def gpu_machine(monkeypatch: pytest.MonkeyPatch):
    """PyTorch sees a GPU; the driver's CUDA and the DALI wheels installed are what the test sets."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    runtime.check_dali_cuda.cache_clear()

    def machine(driver: tuple[int, int], wheels: dict[str, int]) -> None:
        monkeypatch.setattr(runtime, "driver_cuda_version", lambda: driver)
        monkeypatch.setattr(runtime, "installed_dali_wheels", lambda: wheels)

    yield machine
    runtime.check_dali_cuda.cache_clear()


def test_the_check_runs_when_a_command_takes_the_gpu(gpu_machine, caplog: pytest.LogCaptureFixture) -> None:
    gpu_machine((12, 4), CUDA13_WHEEL)
    with pytest.raises(RuntimeError, match=r"built for CUDA 13, and the NVIDIA driver runs CUDA 12\.4 at most"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU path runs any wheel
    result = invoke("eval", "--checkpoint", "missing.pt", expect_error=True)
    assert result.output.count("\n") == 1 and "pip install nvidia-dali-cuda120 (the extra cuda12)" in result.output

    runtime.check_dali_cuda.cache_clear()
    gpu_machine((13, 0), CUDA12_WHEEL)
    with caplog.at_level(logging.WARNING, logger="dali_skd.runtime"):
        assert resolve_device("cuda") == torch.device("cuda", 0)
        resolve_device("auto")
    notes = [r.getMessage() for r in caplog.records]  # once, for the process
    assert len(notes) == 1 and notes[0].startswith("note: NVIDIA DALI here is nvidia-dali-cuda120, built for CUDA 12")


def test_the_extras_install_one_dali_each_and_the_base_none() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("nvidia-dali")]
    extras = project["optional-dependencies"]
    for major, wheel in DALI_WHEELS.items():
        assert [d.split(">=")[0] for d in extras[f"cuda{major}"]] == [wheel]
    assert len(runtime.installed_dali_wheels()) == 1  # the tests' install: cuda13's (.ci/run), or cuda12's


MISSING = """
import sys
sys.modules[sys.argv[1]] = None  # as if not installed: importing it raises ModuleNotFoundError
import cli
cli.main(sys.argv[2:])
"""


@pytest.mark.slow
def test_without_dali_a_command_names_the_extra_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", MISSING, "nvidia.dali", "eval", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == (
        "Error: the data pipeline (NVIDIA DALI) needs the extra 'cuda13' (nvidia.dali is not installed): pip install "
        "-e '.[cuda13]' in the clone of dali-skd (or pip install 'dali-skd[cuda13]')\n"
    )


LISTING = """
import sys
import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
print(sorted(name for name in ("torch", "nvidia.dali", "matplotlib") if name in sys.modules))
"""


def test_the_command_list_imports_neither_torch_nor_dali() -> None:
    """`cli.py --help` lists every command by its summary without building it: a second, not the five a command's
    imports (torch, DALI, matplotlib) take."""
    done = subprocess.run([sys.executable, "-c", LISTING], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *listing, imported = done.stdout.splitlines()
    assert imported == "[]"
    text = "\n".join(listing)
    for name in ["preprocess", *cli.Commands.lazy]:
        assert re.search(rf"^  {name} +\S", text, re.M), name
    assert "Train a model (one process per GPU under torchrun)." in text
