"""Every GPU check in one go, for the (short) time a GPU machine is lent: the loader benchmark on both shard
formats against the DataLoader baseline, training steps in fp16 and bf16 with channels_last_3d on and off, and a
short SKD-SRL training run. Each section has its own time bound and writes its result as soon as it has one, so
one slow case cannot eat the others' time. Prints a table last; the full results go to OUT/gpu_report.json.

    python scripts/gpu_report.py --out $OUT                 # on the GPU machine (see ../shared/gpu/README.md)
    python scripts/gpu_report.py --out /tmp/r --quick --device cpu   # rehearsal on a CPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, command: list[str], limit: float, results: dict, out: Path) -> dict | None:
    """Runs one section; its JSON (if it writes one to OUT/<name>.json) or its failure goes into results."""
    started = time.perf_counter()
    json_path = out / f"{name}.json"
    print(f"== {name}: {' '.join(command)}", flush=True)
    try:
        done = subprocess.run(
            [sys.executable, *command], cwd=REPO, timeout=limit, capture_output=True, text=True, check=False
        )
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        tail = (done.stdout + done.stderr)[-2500:]
    except subprocess.TimeoutExpired as e:
        status, tail = f"timed out after {limit:.0f} s", ((e.stdout or b"")[-2500:]).decode("utf-8", "replace")
    entry = {"status": status, "seconds": round(time.perf_counter() - started, 1), "command": command}
    if json_path.exists():
        entry["result"] = json.loads(json_path.read_text())
    if status != "ok":
        entry["log_tail"] = tail
        print(tail, flush=True)
    results[name] = entry
    (out / "gpu_report.json").write_text(json.dumps(results, indent=2) + "\n")
    return entry.get("result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to rehearse the script on a CPU")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    seconds = "4" if quick else "20"
    workers = str(max(1, (os.cpu_count() or 2) - 2))
    arch = "r3d10-tiny" if quick else "r3d18"
    batch = "8" if quick else "64"
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device_arg": args.device}
    env = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False) if not quick else None
    results["gpu"] = env.stdout.strip() if env and env.returncode == 0 else "none"

    data = {}
    for fmt, per_class in (("jpeg", 3 if quick else 40), ("vp9", 2 if quick else 12)):
        data[fmt] = str(out / f"data-{fmt}")
        run(
            f"preprocess_{fmt}",
            ["cli.py", "preprocess", "--dataset", "synthetic", "--root", str(out / f"videos-{fmt}"), "--out", data[fmt],
             "--format", fmt, "--classes", "4" if quick else "8", "--videos-per-class", str(per_class),
             "--workers", str(os.cpu_count() or 2)],
            120 if quick else 150, results, out,
        )  # fmt: skip
    common = ["--device", args.device, "--seconds", seconds, "--repeats", "3", "--workers", workers]
    run(
        "bench_jpeg",
        ["cli.py", "bench", "--data", data["jpeg"], *common, "--batch-size", batch,
         "--json", str(out / "bench_jpeg.json")],
        90, results, out,
    )  # fmt: skip
    run(
        "bench_vp9",
        ["cli.py", "bench", "--data", data["vp9"], "--loaders", "dali", *common, "--batch-size", batch,
         "--json", str(out / "bench_vp9.json")],
        60, results, out,
    )  # fmt: skip
    for amp, channels_last in (("fp16", True), ("bf16", True), ("fp16", False)):
        name = f"train_{amp}_{'cl' if channels_last else 'ncdhw'}"
        run(
            name,
            ["cli.py", "bench", "--data", data["jpeg"], "--loaders", "", *common, "--train-arch", arch,
             "--amp", amp if not quick else "off", "--channels-last" if channels_last else "--no-channels-last",
             "--json", str(out / f"{name}.json")],
            90, results, out,
        )  # fmt: skip
    run(
        "train_run",
        ["cli.py", "train", "--data", data["jpeg"], "--arch", arch, "--epochs", "2", "--device", args.device,
         "--out", str(out / "run"), "--batch-size", "8" if quick else "32"],
        150, results, out,
    )  # fmt: skip
    metrics = out / "run" / "metrics.jsonl"
    if metrics.exists():
        results["train_run"]["result"] = [json.loads(line) for line in metrics.read_text().splitlines()]
        (out / "gpu_report.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [f"GPU: {results['gpu']}", f"{'section':<22}{'status':<18}figures"]
    for name, entry in results.items():
        if not isinstance(entry, dict) or "status" not in entry:
            continue
        r = entry.get("result")
        figures = ""
        if name.startswith("bench_") and r:
            figures = "  ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in r["loaders"].items())
            if "ratio_dali_over_dataloader" in r:
                figures += f"  ratio {r['ratio_dali_over_dataloader']:.1f}x"
        elif name.startswith("train_") and isinstance(r, dict) and "train" in r:
            t = r["train"]
            figures = (
                f"synthetic {t['synthetic_samples_per_s']:.0f}/s  loader {t['loader_samples_per_s']:.0f}/s "
                f"({t['loader_over_synthetic']:.0%})  wait {t['data_wait']:.0%}"
            )
        elif name == "train_run" and isinstance(r, list) and r:
            figures = f"{len(r)} epochs, last {r[-1]['samples_per_s']:.0f} samples/s, wait {r[-1]['data_wait']:.0%}"
        lines.append(f"{name:<22}{entry['status'][:17]:<18}{figures}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
