"""The README's SLURM examples run: bash executes them with stand-ins for sbatch, srun, scontrol, torchrun and
python that record how they were called, as SLURM would set the environment from the scripts' #SBATCH lines;
then every `cli.py` command they started is parsed by the real click CLI (its work function replaced)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from clickit import invoke
from torch.distributed.run import get_args_parser

from dali_skd.config import PreprocessConfig, TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""
STAND_INS = {
    "python": RECORDER,
    "torchrun": RECORDER,
    "sbatch": '#!/bin/sh\ntest -f "$1" || { echo "sbatch: no $1" >&2; exit 1; }\n',
    "srun": '#!/bin/sh\nexec "$@"\n',  # one task: the command itself
    "scontrol": "#!/bin/sh\nprintf 'node001\\nnode002\\nnode003\\nnode004\\n'\n",
}


def section_blocks(title: str) -> list[tuple[str | None, str]]:
    """(file name, code) of each bash block in the README section `title`; the name is the `NAME`: line before."""
    text = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [(m[1], m[2]) for m in re.finditer(r"(?:`([\w.-]+)`:[^\n]*\n(?:[^\n]+\n)*)?\n```bash\n(.*?)```", text, re.S)]


def slurm_env(script: str) -> dict[str, str]:
    """What SLURM sets for one task of `script` (the third of an array, on node001) from its #SBATCH lines."""
    header = " ".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-004]"}
    if m := re.search(r"--array=1-(\d+)", header):
        env.update(SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT=m[1])
    for flag, name in (("cpus-per-task", "SLURM_CPUS_PER_TASK"), ("nodes", "SLURM_NNODES")):
        if m := re.search(rf"--{flag}=(\d+)", header):
            env[name] = m[1]
    return env


def test_the_slurm_examples_start_commands_that_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = section_blocks("Scale out with SLURM")
    assert [name for name, _ in blocks] == ["preprocess-k400.sbatch", "train-k400.sbatch", None]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "k400").mkdir(parents=True)  # merge's argument must exist
    for number, (name, code) in enumerate(blocks):
        script = tmp_path / (name or f"block{number}.sh")
        script.write_text(code)
        subprocess.run(["bash", "-n", str(script)], check=True)
        env = {**os.environ, **slurm_env(code), "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
        done = subprocess.run(["bash", "-eu", str(script)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"

    started: dict[str, list[Any]] = {"preprocess": [], "merge": [], "train": []}
    monkeypatch.setattr("preprocess.run.run_preprocess", lambda cfg: started["preprocess"].append(cfg) or "")
    merged = SimpleNamespace(splits={}, failures=0)
    monkeypatch.setattr("preprocess.shards.merge_parts", lambda out: started["merge"].append(str(out)) or merged)
    summary = SimpleNamespace(format=lambda: "trained")
    monkeypatch.setattr("dali_skd.training.train", lambda cfg: started["train"].append(cfg) or summary)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [call[0] for call in recorded] == ["python", "torchrun", "python"]
    for program, *args in recorded:
        if program == "torchrun":
            launch = get_args_parser().parse_args(args)
            assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_endpoint) == ("4", "8", "node001:29500")
            args = [launch.training_script, *launch.training_script_args]
        assert args[0] == "cli.py"
        invoke(*args[1:])

    (preprocess,) = started["preprocess"]
    assert isinstance(preprocess, PreprocessConfig)
    assert (preprocess.dataset, preprocess.part, preprocess.workers, preprocess.resume) == (
        "kinetics400",
        "3/16",
        32,
        True,
    )
    assert started["merge"] == ["data/k400"]
    (train,) = started["train"]
    assert isinstance(train, TrainConfig) and (train.data, train.out, train.resume) == (
        "data/k400",
        "runs/k400",
        "auto",
    )


# The training script meeting SLURM's warning before the time limit. Its step is a stand-in torchrun that stops
# (exit 75, as train does once last.pt is saved) on USR1, which the stand-in scancel sends it.
STEP = f"""#!{sys.executable}
import json, os, signal, sys, time
def record(*call):
    with open(os.environ["CALLS"], "a") as calls:
        calls.write(json.dumps(call) + "\\n")
def stop(*_):
    time.sleep(1)  # finishing the step and saving last.pt take a while
    record("step stopped")
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
record("torchrun")
with open(os.environ["STEP_PID"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
"""
CONTROL = f"""#!{sys.executable}
import json, os, signal, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    print("node001")
else:
    with open(os.environ["CALLS"], "a") as calls:
        calls.write(json.dumps([name, *args]) + "\\n")
if name == "scancel":
    os.kill(int(open(os.environ["STEP_PID"]).read()), signal.SIGUSR1)
"""


def test_the_training_script_stops_the_run_before_it_requeues_the_job(tmp_path: Path) -> None:
    (name, code) = section_blocks("Scale out with SLURM")[1]
    assert "--signal=B:USR1@" in code and "--requeue" in code
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program, body in {"srun": STAND_INS["srun"], "torchrun": STEP, "scancel": CONTROL, "scontrol": CONTROL}.items():
        (bin_dir / program).write_text(body)
        (bin_dir / program).chmod(0o755)
    script, calls, step = tmp_path / name, tmp_path / "calls.jsonl", tmp_path / "step.pid"
    script.write_text(code)
    env = {**os.environ, **slurm_env(code), "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    job = subprocess.Popen(["bash", "-eu", str(script)], env={**env, "STEP_PID": str(step)}, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not step.exists() or not step.read_text():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    job.wait(timeout=60)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    stop, requeue = ["scancel", "--signal=USR1", "4242"], ["scontrol", "requeue", "4242"]
    assert recorded == [["torchrun"], stop, ["step stopped"], requeue]


def test_the_compare_sections_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `cli.py compare` command of "Compare the methods" builds the plan it says (the preset's file read from
    the repository, as a user runs it)."""
    text = README.read_text().split("\n## Compare the methods (the paper's Table II)\n", 1)[1].split("\n## ", 1)[0]
    commands = [
        shlex.split(line.split("#", 1)[0])
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("python cli.py compare")
    ]
    plans = []
    monkeypatch.chdir(README.parent)
    monkeypatch.setattr("dali_skd.commands.compare.check_not_in_use", lambda out: None)
    monkeypatch.setattr("dali_skd.comparison.run_comparison", plans.append)
    monkeypatch.setattr("dali_skd.comparison.format_table", lambda report: "")  # of no report: none was run
    for words in commands:
        invoke(*words[2:])
    shown = [(p.settings.data, p.settings.arch, p.seeds, p.settings.val_fraction, len(p.methods)) for p in plans]
    assert shown == [
        ("data/ucf101", "r3d18", 3, 0.1, 5),
        ("data/hard", "r3d10-tiny", 10, 0.25, 5),  # the miniature's preset
        ("data/ucf101", "r3d18", 10, 0.1, 5),
        ("data/ucf101", "r3d18", 3, 0.0, 5),  # the paper's protocol
    ]
