"""The command line's one boundary of errors (`cli.user_errors`, `dali_skd.errors`) and the logging it configures:
the project's errors are one line, a bug says so and where and keeps its traceback in a file, running out of memory
names the setting to lower, and what the core logs shows at the level asked for."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clickit import invoke

import dali_skd.commands.plot
import dali_skd.training
from dali_skd.errors import RunFailed
from dali_skd.progress import configure_logging


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run's folder for `cli.py plot`, whose work the tests replace."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return tmp_path / "run"


def shape_bug(run_dir: str) -> None:
    np.ones((2, 3)) @ np.ones((2, 3))  # a (2, 3) @ (2, 3) product: a bug, however the user called the command


def test_an_internal_error_is_one_line_naming_where_and_its_traceback_file(
    run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(dali_skd.commands.plot, "plot_curves", shape_bug)
    result = invoke("plot", str(run_dir), expect_error=True)
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    where = f"tests/test_errors.py:{shape_bug.__code__.co_firstlineno + 1}"
    assert line.startswith("internal error (a bug in dali-skd, or the machine failing): ValueError: matmul: ")
    assert f", raised at {where}; its traceback is in {tmp_path}/dali-skd-error-" in line
    (report,) = tmp_path.glob("dali-skd-error-*.txt")
    assert line.endswith(f"its traceback is in {report}: please attach it to a bug report")
    text = report.read_text()
    assert "Traceback (most recent call last):" in text and f'{where.split(":")[0]}", line' in text
    assert "in shape_bug\n    np.ones((2, 3)) @ np.ones((2, 3))" in text and "python 3." in text


def test_debug_raises_an_internal_error_as_it_is(run_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("DALI_SKD_DEBUG", "1")
    monkeypatch.setattr(dali_skd.commands.plot, "plot_curves", shape_bug)
    assert isinstance(invoke("plot", str(run_dir), expect_error=True).exception, ValueError)


def test_the_projects_own_errors_stay_one_line(tmp_path: Path) -> None:
    result = invoke("plot", str(tmp_path), expect_error=True)
    assert result.exit_code == 1
    assert result.output == f"Error: no metrics.jsonl in {tmp_path}: is it the --out directory of `cli.py train`?\n"


def dali_out_of_memory() -> Exception:
    """What the loader raises when DALI's GPU allocator fails: its own error, raised from DALI's."""
    try:
        raise RuntimeError("Critical error in pipeline:\nError when executing Mixed operator decoders__Image:\nCUDA "
                           "allocation failed")  # fmt: skip
    except RuntimeError as e:
        try:
            raise RunFailed("the DALI pipeline failed on a batch from shard-000000.tar") from e
        except RunFailed as failed:
            return failed


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
         "out of memory on the GPU (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB), at "),
        (dali_out_of_memory(), "out of memory on the GPU (RuntimeError: Critical error in pipeline:), at "),
        (MemoryError(), "out of memory on this machine (MemoryError), at "),
    ],
)  # fmt: skip
def test_out_of_memory_names_the_settings_to_lower(tmp_path: Path, monkeypatch, error: Exception, said: str) -> None:
    def fails(cfg) -> None:
        raise error

    monkeypatch.setattr(dali_skd.training, "train", fails)
    result = invoke("train", "--out", str(tmp_path / "run"), expect_error=True)
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: {said}")
    lower = "--batch-size or --loader.prefetch"
    if isinstance(error, MemoryError):
        lower += " or --sampling.shuffle-buffer"
    assert line.endswith(f": lower {lower}, then run the command again")


def test_the_log_level_by_flag_or_environment_and_one_voice_under_torchrun(run_dir: Path, monkeypatch) -> None:
    def logs(run_dir: str) -> str:
        log = logging.getLogger("dali_skd.plot")
        log.debug("a detail")
        log.info("an epoch done")
        log.warning("a sample skipped")
        log.error("a failure")
        return "plotted"

    monkeypatch.setattr(dali_skd.commands.plot, "plot_curves", logs)

    def shown(*args: str) -> list[str]:
        result = invoke(*args, "plot", str(run_dir))
        assert result.stdout == "plotted\n"  # the command's own output, whatever the level
        return result.stderr.splitlines()

    every = ["a detail", "an epoch done", "a sample skipped", "a failure"]
    assert shown() == every[1:]  # info by default
    assert shown("--log-level", "warning") == every[2:]
    monkeypatch.setenv("DALI_SKD_LOG_LEVEL", "debug")
    assert shown() == every
    assert shown("--log-level", "ERROR") == every[3:]  # the flag wins
    monkeypatch.setenv("RANK", "1")  # another rank of a torchrun job: only its errors, named by rank
    assert shown() == ["rank 1: a failure"]
    monkeypatch.delenv("RANK")
    configure_logging("info")  # as the other tests have it
    monkeypatch.setenv("DALI_SKD_LOG_LEVEL", "loud")
    result = invoke("plot", str(run_dir), expect_error=True)
    assert result.exit_code == 2 and "Invalid value for '--log-level' (env var: 'DALI_SKD_LOG_LEVEL')" in result.output
