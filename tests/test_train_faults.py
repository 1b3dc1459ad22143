"""`train` against what a cluster does to a run: a signal mid-epoch (SIGTERM from SLURM, Ctrl-C), a requeued job
(`--resume auto`), a second run into the same --out, a learning rate that diverges, fp16 steps the grad scaler
skips, a full disk, a torn metrics line, and a log that is a file. Real `cli.py train` processes where a signal or
a second process is the point; the trainer in-process elsewhere."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import write_checkpoint

from dali_skd import memory, training
from dali_skd.checkpoint import nonfinite_tensors
from dali_skd.config import ClipConfig, LoaderConfig, SamplingConfig, TrainConfig
from dali_skd.data.loader import ClipLoader, EvalLoader
from dali_skd.distributed import init_distributed
from dali_skd.evaluation import EvalResult, evaluate
from dali_skd.models import build_model
from dali_skd.signals import EXIT_STOPPED
from dali_skd.training import Diverged, train

REPO = Path(__file__).resolve().parents[1]
TIMING = ("samples_per_s", "data_wait", "epoch_seconds", "val_seconds")  # the metrics that differ between two runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of 12-frame noise videos told apart by their tint: 16 for training (8 steps of 2), 4 for testing."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(20)]
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, {"train": videos[:16], "test": videos[16:]}, ["a", "b"], per_shard=2)


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{
            "arch": "r3d10-tiny", "data": str(data), "out": str(out), "epochs": 2, "batch_size": 2, "device": "cpu",
            "clip": ClipConfig(length=8, crop=32), "sampling": SamplingConfig(shuffle_buffer=2),
            "loader": LoaderConfig(threads=1), **kw,
        }
    )  # fmt: skip


def flags(cfg: TrainConfig) -> list[str]:
    """`cli.py train` flags for `tiny`'s settings."""
    return ["--data", cfg.data, "--out", cfg.out, "--arch", cfg.arch, "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--clip.length", "8", "--clip.crop", "32",
            "--sampling.shuffle-buffer", "2", "--loader.threads", "1", "--device", "cpu"]  # fmt: skip


def start(*args: str) -> subprocess.Popen:
    """`cli.py train ARGS` in its own process, a progress line every step, stdout and stderr in one pipe."""
    env = {**os.environ, "DALI_SKD_LOG_SECONDS": "0"}  # and torch's threads as here: sums in the same order
    command = [sys.executable, str(REPO / "cli.py"), "train", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def signal_after(process: subprocess.Popen, line: str, sig: signal.Signals) -> tuple[int, str]:
    """Sends `sig` once the process has printed a line starting with `line`; its exit code and whole output."""
    seen = []
    for text in process.stdout:
        seen.append(text)
        if text.startswith(line):
            process.send_signal(sig)
            break
    seen.append(process.stdout.read())
    return process.wait(timeout=300), "".join(seen)


def state(out: Path) -> dict:
    return torch.load(out / "last.pt", weights_only=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(value, b[key]) for key, value in a.items())


def test_a_batch_larger_than_the_split_or_than_memory_is_refused_before_it_is_allocated(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    """A batch larger than the split was made of samples repeated; one larger than memory got the process killed by
    the kernel (--batch-size 100000: exit 137 after 70 s, no word). Both are one line naming --batch-size and the
    largest that works, before a pipeline or a step runs (here memory is mocked: nothing large is allocated)."""
    result = invoke("train", *flags(tiny(data, tmp_path / "a", batch_size=17)), expect_error=True)
    assert result.output.count("\n") == 1 and "Error: --batch-size 17 is larger than split train of " in result.output
    assert "(it holds 16 samples): lower --batch-size to 16 or less" in result.output
    monkeypatch.setattr(memory, "available_memory", lambda: 56 << 20)  # the tiny model's weights leave a few MiB
    built, estimates = [], []
    monkeypatch.setattr(ClipLoader, "_pipeline", lambda self: built.append(self))
    estimate = memory.training_memory
    monkeypatch.setattr(training, "training_memory", lambda *a: estimates.append(estimate(*a)) or estimates[-1])
    result = invoke("train", *flags(tiny(data, tmp_path / "b", batch_size=16)), expect_error=True)
    line = result.output.strip().splitlines()[-1]
    fits = re.fullmatch(
        r"Error: --batch-size 16 needs about [\d.]+ GiB of memory here \(the model 0\.0 GiB, the training step's "
        r"activations [\d.]+ GiB, the loaders' buffers [\d.]+ GiB\), and 0\.1 GiB is available: lower --batch-size "
        r"to (\d+) or less \(or free memory, or use a GPU\)",
        line,
    )
    assert fits and 0 < int(fits[1]) < 16 and built == [] and not (tmp_path / "b" / "last.pt").exists(), line
    (needs,) = estimates  # the batch it names is the largest the estimate takes
    assert needs.needed(int(fits[1])) <= 56 << 20 < needs.needed(int(fits[1]) + 1)


def test_a_clip_longer_than_most_videos_is_refused_and_one_longer_than_some_said(
    data: Path, tmp_path: Path, caplog
) -> None:
    """--clip.length 1000 on videos of about 125 frames was taken without a word: 5 min 18 s an epoch against 9 s,
    each video looped 8 times. The shards' metadata holds every video's frames."""
    result = invoke("train", *flags(tiny(data, tmp_path / "a")), "--clip.length", "13", expect_error=True)
    assert result.output == (
        f"Error: --clip.length 13 spans 13 frames, more than 16 of the 16 videos of split train of {data} hold "
        "(median 12 frames): each would be looped to fill its clips, decoding the same frames again; lower "
        "--clip.length (a clip of 12 frames fits half of them)\n"
    )
    result = invoke("train", *flags(tiny(data, tmp_path / "b")), "--clip.length", "7", "--clip.frame-stride", "2",
                    expect_error=True)  # fmt: skip
    assert "--clip.length 7 x --clip.frame-stride 2 spans 13 frames" in result.output
    assert "lower --clip.length or --clip.frame-stride" in result.output
    short = tmp_path / "short"  # 3 of 8 videos shorter than a clip of 10: said once, and trained on
    videos = [(noise_frames(8 if i < 3 else 12, seed=i, tint=i % 2), i % 2) for i in range(10)]
    write_dataset(short, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=4)
    with caplog.at_level("WARNING"):
        train(tiny(short, tmp_path / "c", epochs=1, clip=ClipConfig(length=10, crop=32)))
    assert "3 of the 8 videos of split train are shorter than a clip (--clip.length 10: 10 frames)" in caplog.text


@pytest.mark.slow
def test_sigterm_and_sigint_mid_epoch_then_resume_give_the_weights_of_an_uninterrupted_run(
    data: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    monkeypatch.setenv("DALI_SKD_LOG_SECONDS", "0")
    train(tiny(data, tmp_path / "straight"))
    log = "".join(capfd.readouterr())  # what a log file would hold: stderr is no terminal here
    assert "\r" not in log
    step_line = r"^epoch 1/2: 3/8 steps, loss \S+, samples \S+/s, data wait \d+%, \S+ steps/s, \S+ left$"
    assert re.search(step_line, log, re.M)
    assert re.search(r"^epoch 2/2: loss \S+, train top-1 .*; validation top-1 \S+% top-5 \S+% \(4 videos\)", log, re.M)

    cfg = tiny(data, tmp_path / "stopped")
    code, output = signal_after(start(*flags(cfg)), "epoch 1/2: 2/8 steps", signal.SIGTERM)
    assert code == EXIT_STOPPED, output
    stopped = state(tmp_path / "stopped")
    assert (stopped["epoch"], stopped["step"]) in ((0, 2), (0, 3))  # the step it was on finished, nothing more
    assert f"stopped by SIGTERM at epoch 1, step {stopped['step']} of 8; {cfg.out}/last.pt holds it" in output
    assert "continue with the same command and --resume" in output and "Traceback" not in output

    code, output = signal_after(start(*flags(cfg), "--resume"), "epoch 2/2: 2/8 steps", signal.SIGINT)
    assert code == EXIT_STOPPED, output
    assert f"resuming epoch 1 at step {stopped['step'] + 1}" in output and "stopped by SIGINT at epoch 2" in output
    train(tiny(data, tmp_path / "stopped", resume=True))

    assert same_weights(state(tmp_path / "straight")["method"], state(tmp_path / "stopped")["method"])
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "stopped"), strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def children(pid: int) -> dict[int, dict[str, str]]:
    """The child processes of `pid`, with their environments (Linux's /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pairs = (item.partition(b"=") for item in (entry / "environ").read_bytes().split(b"\0") if item)
                found[int(entry.name)] = {k.decode(): v.decode(errors="replace") for k, _, v in pairs}
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(data: Path, tmp_path: Path) -> None:
    cfg = tiny(data, tmp_path / "run")  # 16 videos, 2 ranks of 2: 4 steps an epoch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    env = {**os.environ, "DALI_SKD_LOG_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    command = [*launch, str(REPO / "cli.py"), "train", *flags(cfg), "--log-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch 1/2: 1/4 steps"):  # rank 0's progress
            (rank1,) = [pid for pid, environ in children(process.pid).items() if environ.get("RANK") == "1"]
            os.kill(rank1, signal.SIGTERM)  # only rank 1: say, torchrun forwarded it on one machine only
            break
    output = "".join(seen) + process.stdout.read()
    assert process.wait(timeout=300) != 0  # torchrun's own code for workers that did not exit 0
    assert output.count("exitcode  : 75") == 2 and "\nError: " not in output  # both ranks stopped, neither failed
    saved = state(tmp_path / "run")
    assert saved["epoch"] == 0 and 1 <= saved["step"] <= 4 and saved["world"] == 2  # rank 1 may lag a step behind
    assert f"stopped by a signal to another rank at epoch 1, step {saved['step']} of 4" in output
    assert output.count("stopped by") == 1  # rank 0 says it, for both


@pytest.mark.slow
def test_a_second_train_into_a_running_run_fails_at_once_and_leaves_it_alone(data: Path, tmp_path: Path) -> None:
    cfg = tiny(data, tmp_path / "run")
    first = start(*flags(cfg))
    started = next(line for line in first.stdout if line.startswith("epoch 1/2: 1/8 steps"))
    config = (tmp_path / "run" / "config.json").read_bytes()
    for again in (["--optim.lr", "0.5"], ["--resume"]):  # an sbatch sent twice; a job requeued while its old copy lives
        message = invoke("train", *flags(cfg), *again, expect_error=True).output
        assert f"{cfg.out} is in use by host " in message and f", pid {first.pid} (lock {cfg.out}/.lock)" in message
    assert (tmp_path / "run" / "config.json").read_bytes() == config and not (tmp_path / "run" / "last.pt").exists()
    output = started + first.stdout.read()
    assert first.wait(timeout=300) == 0, output
    assert [row["epoch"] for row in metrics(tmp_path / "run")] == [1, 2] and "best validation top-1" in output


@pytest.mark.slow
def test_resume_auto_starts_or_continues_and_a_torn_metrics_line_is_dropped(data: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match=r"last\.pt does not exist, so there is no run to continue"):
        train(tiny(data, tmp_path / "nothing", resume=True))
    out = tmp_path / "run"
    train(tiny(data, out, epochs=1, batch_size=4, resume="auto"))  # the first submission of a requeued job
    assert f"--resume auto: no {out}/last.pt yet, starting a new run" in capsys.readouterr().err
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.01, "loss": 0.6')  # killed while writing epoch 2's line
    train(tiny(data, out, epochs=2, batch_size=4, resume="auto"))  # the requeued one, the same command
    assert "metrics.jsonl: dropped its last line, cut short" in capsys.readouterr().err
    assert [row["epoch"] for row in metrics(out)] == [1, 2]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_while_saving_names_the_checkpoint_keeps_the_last_and_the_run_resumes(
    data: Path, tmp_path: Path
) -> None:
    cfg = tiny(data, tmp_path / "run", epochs=1, batch_size=4)
    train(cfg)
    last = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "run" / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC
    message = invoke("train", *flags(cfg), "--epochs", "2", "--batch-size", "4", "--resume", expect_error=True).output
    assert f"Error: cannot write {cfg.out}/last.pt: the disk is full (No space left on device)" in message
    assert "then run the command again with --resume" in message
    assert (tmp_path / "run" / "last.pt").read_bytes() == last
    train(tiny(data, tmp_path / "run", epochs=2, batch_size=4, resume=True))
    assert state(tmp_path / "run")["epoch"] == 2 and [row["epoch"] for row in metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_a_diverging_lr_stops_naming_the_step_and_leaves_no_nonfinite_checkpoint(data: Path, tmp_path: Path) -> None:
    cfg = tiny(data, tmp_path / "run", epochs=4, batch_size=4)
    message = invoke("train", *flags(cfg), "--batch-size", "4", "--optim.lr", "1e4", expect_error=True).output
    terms = r"loss (nan|inf|-inf), loss_ce \S+, loss_kl \S+, loss_sim \S+"
    assert re.search(rf"the loss is not finite at epoch \d, step \d of 4 \({terms}\): training diverged", message)
    assert "a lower --optim.lr (this run: 10000)" in message and "Traceback" not in message
    for name in ("last.pt", "best.pt"):
        if (tmp_path / "run" / name).exists():
            assert not nonfinite_tensors(torch.load(tmp_path / "run" / name, weights_only=True)["method"])


@pytest.mark.slow
def test_fp16_steps_the_scaler_skips_are_counted_and_too_many_in_a_row_stop(data: Path, tmp_path: Path) -> None:
    # at the scaler's first scale (65536) this model's fp16 gradients overflow: its first steps are skipped
    train(tiny(data, tmp_path / "counted", epochs=1, batch_size=4, amp="fp16"))
    assert metrics(tmp_path / "counted")[0]["scaler_skipped_steps"] >= 1
    with pytest.raises(Diverged, match=r"not finite at any scale for 1 steps in a row, up to epoch 1, step 1"):
        train(tiny(data, tmp_path / "stopped", epochs=1, batch_size=4, amp="fp16", max_skipped_steps=1))


def test_eval_refuses_a_checkpoint_with_nonfinite_weights(data: Path, tmp_path: Path) -> None:
    weights = build_model("r3d10-tiny", 2).state_dict()
    weights["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "diverged.pt"
    write_checkpoint(path, TrainConfig(arch="r3d10-tiny"), weights)
    for command in (["eval", "--data", str(data)], ["features", "--data", str(data), "--out", str(tmp_path / "f")]):
        message = invoke(*command, "--checkpoint", str(path), "--device", "cpu", expect_error=True).output
        assert f"{path} holds non-finite weights (1 of {len(weights)} tensors, e.g. model.fc.weight)" in message


class NaNModel(torch.nn.Module):
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return torch.full((len(clips), 2), float("nan"))


def test_evaluation_counts_the_clips_scored_nan(data: Path) -> None:
    cfg = tiny(data, Path("unused"))
    loader = EvalLoader(cfg.data, "test", clip=cfg.clip, loader=cfg.loader, batch_size=4, clips_per_video=2)
    result = evaluate(NaNModel(), loader, init_distributed("cpu"), "fp32")
    assert result.nonfinite_clips == result.clips == 8 and "8 clips scored NaN or infinity" in result.format()


@pytest.mark.slow
def test_a_validation_with_nonfinite_scores_is_never_the_best(data: Path, tmp_path: Path, monkeypatch) -> None:
    validations = []

    def overflowing_in_epoch_2(*args, **kwargs) -> EvalResult:  # as an fp16 model whose outputs overflow scores
        validations.append(evaluate(*args, **kwargs))
        if len(validations) == 2:
            return dataclasses.replace(validations[-1], video_top1=1.0, nonfinite_clips=4)
        return validations[-1]

    monkeypatch.setattr("dali_skd.training.evaluate", overflowing_in_epoch_2)
    summary = train(tiny(data, tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert rows[0]["val_top1"] < 1.0 and rows[1]["val_top1"] == 1.0 and rows[1]["val_nonfinite_clips"] == 4
    assert summary.best_epoch == 1 and [row["best_top1"] for row in rows] == [rows[0]["val_top1"]] * 2
