"""The project's GPU check, in one command, for the few minutes a GPU machine is lent.

    python3 scripts/gpu_report.py --prepare DIR          # here, with the project installed: the data to carry
    python3 scripts/gpu_report.py --stage-peers .gpu-peers   # here: the peer loaders' wheels, a fourth piece
    python3 scripts/gpu_report.py --data DIR --out OUT   # there: every section, within 450 s
    python3 scripts/gpu_report.py --data DIR --out OUT --device cpu --quick   # rehearsal on a CPU machine

`--prepare` preprocesses the built-in synthetic videos into jpeg shards with 4, 8 and 16 frames per JPEG
(DIR/fpj4, DIR/fpj8, DIR/fpj16, a few MiB each) and, at the default frames per JPEG, with other JPEG qualities and
Huffman tables (JPEG_VARIANTS: DIR/q90-std, the defaults before docs/benchmarks.md's "Shard settings", ...), and
re-encodes the training videos for the peer loaders as
`cli.py bench` does (h264 mp4 at the shards' short side, DIR/peer-cache): nothing is encoded on the GPU machine,
which has no ffmpeg. `--stage-peers` downloads the wheels of the peer loaders (PyAV, decord; torchcodec needs
FFmpeg's libraries, which the GPU machine lacks) for its Python, under 60 MiB: they travel as a fourth piece
beside stage-wheels.sh's three (too full to hold them), copied into the same /tmp/ck, so that install-staged.sh
installs them with DALI. A rehearsal copies the wheels staged for its own Python into $CK and sources
install-staged.sh again (`--stage-peers DIR --python 3.11`; the rehearsal command in docs/benchmarks.md).

The check runs these sections in order, each in its own process with its own time bound; each section's result
goes into OUT/gpu_report.json as soon as it ends (`status` "ok" when it passed), its output into OUT/<section>.log:

    parity      GPU-vs-CPU (and Pillow) decode of the same unaugmented clips: max and mean absolute difference, of
                RGB and of luma, for the CUDA decoder alone (hw_decoder_load 0) and the hardware engine (1)
    tests       `pytest -m gpu tests/test_gpu.py`: the GPU path's tests (they skip without a GPU)
    sweep       the DALI loader, frames per JPEG 4/8/16 x hw_decoder_load 0.65/1.0, the JPEG variants (0.65 only),
                and its host side alone:
                two-view samples/s, CPU cores busy; per pipeline its decoders and threads, its build time and the
                threads the process holds; the host side's cost of checking strips
    train       r3d18 SKD-SRL training steps (fp16, channels_last_3d) on synthetic tensors and on the loader,
                with the time spent waiting for data
    dataloader  the PyTorch DataLoader baseline with 14 worker processes
    peers       the DALI loader against the loaders users pick instead (DataLoaders with 14 workers over the
                re-encoded videos, decoded by decord, PyAV, torchcodec), crop and flip only, alternating in rounds:
                as many rounds (at most 3) as its time allows, each written as it ends

Only the project's source tree is needed there (it puts itself on the path), with torch, numpy, Pillow and
click, plus DALI, webdataset and braceexpand; on a machine without network these may have been unpacked with
`pip install --target SITE` (SITE from the environment, else /tmp/site), and SITE is then put on the path too,
even when PYTHONPATH names only the source tree. A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _paths() -> None:
    """The source tree first, then packages unpacked into SITE when they are not importable otherwise; the
    sections, run as child processes, inherit both through PYTHONPATH."""
    paths = [str(REPO)]
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        paths += [s for s in (os.environ.get("SITE"), "/tmp/site") if s and Path(s, "nvidia", "dali").is_dir()][:1]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])


_paths()

BUDGET_S = 420.0  # the whole check
BUDGET_S = 450.0  # the whole check: a lent GPU gives 15 minutes, its start and the carried pieces included
# the bound of each (GPU), in the order they run: what only a GPU can show first
SECTIONS = {"parity": 40.0, "tests": 70.0, "sweep": 150.0, "train": 80.0, "dataloader": 40.0, "peers": 70.0}
REHEARSAL_SLOWER = 3.0  # --quick --device cpu: the bounds stretched, a shared 2-core machine being what rehearses
FRAMES_PER_JPEG = (4, 8, 16)
DECODER_LOADS = (0.65, 1.0)
# JPEG quality and Huffman tables beside the default ones, at the default frames per JPEG (DIR/q90-std ...): what
# nvJPEG makes of the settings docs/benchmarks.md's "Shard settings" table weighs; q90-std: the defaults before it
JPEG_VARIANTS = {"q90-std": (90, False), "q75-opt": (75, True), "q65-opt": (65, True), "q50-std": (50, False)}
PEER_WHEELS = ("av", "decord")  # what the GPU machine can run: both bring their own FFmpeg libraries
PIECE_MIB = 60  # the most that travels to the GPU machine at a time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="make the data to carry into DIR, then stop")
    parser.add_argument("--data", type=Path, metavar="DIR", help="the folder --prepare made")
    parser.add_argument("--out", type=Path, metavar="OUT", help="where gpu_report.json and the logs go")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and times: a rehearsal on a CPU machine")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # one section, in-process
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)  # the section's time, for those that adapt
    parser.add_argument("--stage-peers", type=Path, metavar="DIR", help="download the peer loaders' wheels into DIR")
    parser.add_argument("--python", default="3.12", help="--stage-peers: for this Python (the GPU machine's: 3.12)")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
    elif args.stage_peers:
        stage_peers(args.stage_peers, args.python)
    elif args.data is None or args.out is None:
        parser.error("pass --prepare DIR, or --data DIR and --out OUT")
    elif args.section:
        result = globals()[f"section_{args.section}"](args)
        (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=2) + "\n")
        sys.exit(result.get("exit_code", 0))
    else:
        run_all(args)


# -- here: the data to carry -------------------------------------------------------------------------------------


def prepare(out: Path, classes: int = 2, videos_per_class: int = 3) -> None:
    """The built-in synthetic videos (5 s, 170 x 128 once preprocessed), preprocessed once per frames-per-JPEG."""
    from dali_skd.config import PreprocessConfig
    from preprocess.run import run_preprocess  # ffmpeg: only here, never on the GPU machine

    out.mkdir(parents=True, exist_ok=True)
    sets = {f"fpj{fpj}": {"frames_per_jpeg": fpj} for fpj in FRAMES_PER_JPEG}
    sets |= {name: {"quality": q, "optimize_huffman": opt} for name, (q, opt) in JPEG_VARIANTS.items()}
    with tempfile.TemporaryDirectory() as videos:
        for name, settings in sets.items():
            cfg = PreprocessConfig(
                dataset="synthetic", root=videos, out=str(out / name), classes=classes,
                videos_per_class=videos_per_class, workers=os.cpu_count() or 1, **settings,
            )  # fmt: skip
            print(run_preprocess(cfg, progress=False).format())
        prepare_peer_videos(out, videos)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB to carry; run `python3 scripts/gpu_report.py --data {out} --out OUT`")


def prepare_peer_videos(out: Path, videos: str) -> None:
    """The fpj8 set's training videos as `cli.py bench` re-encodes them for the peers, in the cache the peers
    section reads (DIR/peer-cache): found there, they need neither ffmpeg nor the originals."""
    from dali_skd.commands.bench import peer_videos

    found = peer_videos(str(out / "fpj8"), videos, str(out / "peer-cache"), as_is=False, workers=os.cpu_count() or 1)
    print(f"peer-cache: {len(found.files)} videos, {found.form}, {found.bytes_per_video / 1e3:.0f} kB each")


def stage_peers(out: Path, python: str) -> None:
    """The peer loaders' wheels for the GPU machine's Python, as stage-wheels.sh downloads DALI's (no network
    there): one piece of under PIECE_MIB. Into a rehearsal's staged third piece (`.gpu-rehearse/c3`, which never
    travels), rehearse.sh installs them with DALI, as the GPU machine will."""
    platforms = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux2010")
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python, "--implementation", "cp", *(f"--platform={p}_x86_64" for p in platforms), "-d", str(out),
               *PEER_WHEELS]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for old in [w for name in PEER_WHEELS for w in out.glob(f"{name}-*.whl")]:
        old.unlink()  # another version, staged before
    subprocess.run(command, check=True)
    wheels = sorted(w for name in PEER_WHEELS for w in out.glob(f"{name}-*.whl"))
    size, names = sum(w.stat().st_size for w in wheels) / 2**20, ", ".join(w.name for w in wheels)
    if size >= PIECE_MIB:
        sys.exit(f"{out}: {size:.1f} MiB of wheels ({names}), over the {PIECE_MIB} MiB that travel at a time")
    print(f"{out}: {size:.1f} MiB ({names}); into /tmp/ck with the other pieces: install-staged.sh installs them")


# -- there: the sections ---------------------------------------------------------------------------------------


def _data(args: argparse.Namespace, fpj: int | str = 8) -> str:
    return str(args.data / (fpj if isinstance(fpj, str) else f"fpj{fpj}"))


def section_parity(args: argparse.Namespace) -> dict:
    """The CUDA decoder alone (hw_decoder_load 0) and the hardware engine (1) against the CPU and Pillow."""
    from dali_skd.commands.bench import decode_parity

    devices = ["cuda", "cpu"] if args.device == "cuda" else ["cpu"]
    return decode_parity(_data(args), devices, split="train", videos=4, hw_loads=(0.0, 1.0))


def section_sweep(args: argparse.Namespace) -> dict:
    """Every (frames per JPEG, hw_decoder_load) pair, the JPEG variants at the first load, then the host side alone;
    written after each run."""
    from dali_skd.commands.bench import BenchConfig, run_bench
    from dali_skd.config import LoaderConfig

    seconds, batch = (2.0, 16) if args.quick else (6.0, 64)
    rows: list[dict] = []
    first, *others = DECODER_LOADS  # the JPEG variants at the default load before the other loads: first in, first cut
    runs: list[tuple[str, int | str, float]] = [("dali", f, first) for f in FRAMES_PER_JPEG]
    runs += [("dali", name, first) for name in JPEG_VARIANTS]
    runs += [("dali", f, load) for load in others for f in FRAMES_PER_JPEG] + [("host", 8, first)]
    for loader, fpj, load in runs:
        cfg = BenchConfig(
            data=_data(args, fpj), device=args.device, loaders=loader, batch_size=batch, seconds=seconds, repeats=3,
            rounds=1, loader=LoaderConfig(hw_decoder_load=load),
        )  # fmt: skip
        report = run_bench(cfg)
        manifest = {k: report[k] for k in ("frames_per_jpeg", "quality", "optimize_huffman")}
        rows.append({"loader": loader, "data": Path(_data(args, fpj)).name, **manifest, "hw_decoder_load": load,
                     **report["loaders"][loader]})  # fmt: skip
        (args.out / "sweep.json").write_text(json.dumps({"rows": rows, "partial": True}, indent=2) + "\n")
    return {"rows": rows}


def section_dataloader(args: argparse.Namespace) -> dict:
    from dali_skd.commands.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        data=_data(args), device=args.device, loaders="dataloader", workers=2 if args.quick else 14,
        batch_size=16 if args.quick else 64, seconds=3.0 if args.quick else 15.0, repeats=3, rounds=1,
    )  # fmt: skip
    return run_bench(cfg)["loaders"]["dataloader"]


def section_train(args: argparse.Namespace) -> dict:
    from dali_skd.commands.bench import BenchConfig, BenchTrainConfig, run_bench

    steps = BenchTrainConfig(arch="r3d10-tiny" if args.quick else "r3d18", batch_size=4 if args.quick else 32)
    cfg = BenchConfig(
        data=_data(args), device=args.device, loaders="", train=steps, amp="off" if args.device == "cpu" else "fp16",
        seconds=6.0 if args.quick else 40.0, repeats=3,
    )  # fmt: skip
    return run_bench(cfg)["train"]


def section_peers(args: argparse.Namespace) -> dict:
    """The DALI loader against DataLoaders over the re-encoded videos (--prepare made them), crop and flip only;
    rounds and seconds cut to fit `args.limit`, each round's figures written as it ends."""
    from dali_skd.commands.bench import BenchAugmentConfig, BenchConfig, run_bench

    loaders = ["dali", "decord", "pyav", "torchcodec"]
    seconds, overhead = (2.0, 6.0) if args.quick else (8.0, 8.0)  # overhead: warm-up, workers or pipeline started
    per_round = len(loaders) * (seconds * 1.1 + overhead)
    room = (args.limit or SECTIONS["peers"]) - 20  # imports, the videos found, the table
    rounds = max(1, min(3, int(room // per_round)))
    if room < per_round:
        seconds = max(1.0, room / len(loaders) / 1.1 - overhead)
    cfg = BenchConfig(
        data=_data(args), device=args.device, loaders=",".join(loaders), workers=2 if args.quick else 14,
        batch_size=8 if args.quick else 64, seconds=seconds, repeats=3, rounds=rounds,
        cache=str(args.data / "peer-cache"), augment=BenchAugmentConfig(policy="crop-flip"),
    )  # fmt: skip

    def partial(report: dict) -> None:
        figures = {k: report[k] for k in ("loaders", "skipped", "videos", "rounds", "augment")}
        (args.out / "peers.json").write_text(json.dumps({**figures, "partial": True}, indent=2) + "\n")

    report = run_bench(cfg, on_round=partial)
    return {k: report[k] for k in ("loaders", "skipped", "videos", "rounds", "augment")} | {"seconds": seconds}


def section_tests(args: argparse.Namespace) -> dict:
    """The GPU tests, in a pytest run of their own; their counts from its JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    xml = args.out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    done = subprocess.run([*command, "tests/test_gpu.py"], cwd=REPO, check=False)
    counts = {"exit_code": done.returncode}
    if xml.exists():
        suite = ElementTree.parse(xml).getroot().find("testsuite")
        if suite is not None:
            counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
            reasons = {e.get("message", "") for e in suite.iter("skipped")}
            counts["skip_reasons"] = sorted(reasons)
    return counts


# -- running them --------------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    needed = [f"fpj{f}" for f in FRAMES_PER_JPEG] + list(JPEG_VARIANTS)
    missing = [name for name in needed if not (args.data / name / "manifest.json").is_file()]
    if missing:
        sys.exit(
            f"{args.data} lacks {', '.join(missing)}: make it here with `python3 scripts/gpu_report.py --prepare DIR`"
        )
    stretch = REHEARSAL_SLOWER if args.quick and args.device == "cpu" else 1.0
    deadline = time.monotonic() + BUDGET_S * stretch
    report: dict = {"machine": machine(), "sections": {}}
    save = lambda: (out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731
    save()
    for name, bound in SECTIONS.items():
        limit = min(bound * stretch, deadline - time.monotonic() - 5)
        report["sections"][name] = run_section(name, args, limit) if limit > 10 else {"status": "no time left"}
        save()
        print(f"== {name}: {report['sections'][name]['status']}", flush=True)
    print(table(report))


def run_section(name: str, args: argparse.Namespace, limit: float) -> dict:
    """One section in its own process, killed after `limit` seconds; what it wrote is kept either way."""
    command = [sys.executable, "-u", __file__, "--section", name, "--data", str(args.data), "--out", str(args.out),
               "--device", args.device, "--limit", f"{limit:.0f}", *(["--quick"] if args.quick else [])]  # fmt: skip
    log = args.out / f"{name}.log"
    started = time.monotonic()
    with open(log, "w") as sink:
        try:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=limit, check=False)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    entry: dict = {"status": status, "seconds": round(time.monotonic() - started, 1), "log": log.name}
    result = args.out / f"{name}.json"
    if result.exists():
        entry["result"] = json.loads(result.read_text())
    if status != "ok":
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    return entry


def machine() -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as e:
        info["dali"] = f"not importable ({e})"
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    return info


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"{m['gpu'] or 'no GPU'}, {m['cpu_cores']} CPU cores, torch {m['torch']}, DALI {m['dali']}, {m['date']}"]
    for name, entry in report["sections"].items():
        lines.append(f"-- {name}: {entry['status']} ({entry.get('seconds', 0):.0f} s)")
        r = entry.get("result") or {}
        if name == "parity":
            for pair, d in r.get("pairs", {}).items():
                lines.append(
                    f"   {pair}: max {d['max_abs']:.1f}, mean {d['mean_abs']:.2f} levels; luma max "
                    f"{d['luma_max_abs']:.1f}, mean {d['luma_mean_abs']:.2f}"
                )
        elif name == "sweep":
            header = "   loader  fpj  quality  hw load  samples/s  cores busy  CPU us/sample"
            lines.append(header + "  decoders x threads  build s  threads")
            for w in r.get("rows", []):
                busy = w["cpu_cores_busy"] or 0
                pipeline = ""
                if "decoders" in w:
                    pipeline = f"{w['decoders']:>11} x {w['dali_threads']:<6}{w['pipeline_build_s']:>9.1f}"
                    pipeline += f"{w.get('process_threads', 0):>9}"
                jpeg = f"{w.get('quality', '')}{' opt' if w.get('optimize_huffman') else ' std'}"
                lines.append(
                    f"   {w['loader']:<6}{w['frames_per_jpeg']:>5}{jpeg:>9}{w['hw_decoder_load']:>9.2f}"
                    f"{w['samples_per_s']:>11.0f}{busy:>12.1f}{w['cpu_us_per_sample']:>15.0f}{pipeline}"
                )
                if "check_every_read_us_per_sample" in w:
                    lines.append(
                        f"   strip checks: every read {w['check_every_read_us_per_sample']:+.0f} us/sample over first "
                        f"use; a first pass {w['first_pass_check_us_per_video']:.0f} us/video"
                    )
        elif name == "dataloader" and r:
            lines.append(f"   {r['samples_per_s']:.0f} samples/s, {r['cpu_cores_busy'] or 0:.1f} cores busy")
        elif name == "peers" and r:
            lines.append(f"   {r['augment']}, {r.get('seconds', 0):.0f} s a round; samples/s (each round), x dali, "
                         "CPU us/sample, disk/video")  # fmt: skip
            for loader, f in r.get("loaders", {}).items():
                rounds = " ".join(f"{x:.0f}" for x in f["rounds"])
                ratio = f"{f['ratio_to_dali']:.2f}" if "ratio_to_dali" in f else "-"
                lines.append(
                    f"   {loader:<11}{f['samples_per_s']:>7.0f} ({rounds}) {ratio:>6}{f['cpu_us_per_sample']:>9.0f}"
                    f"{f['disk_bytes_per_video'] / 1e3:>8.0f} kB  {f['reads']}"
                )
            for loader, why in r.get("skipped", {}).items():
                lines.append(f"   {loader:<11}skipped: {why}")
        elif name == "tests" and r:
            lines.append(
                f"   {r.get('tests', 0)} tests: {r.get('failures', 0)} failed, {r.get('errors', 0)} errors, "
                f"{r.get('skipped', 0)} skipped {r.get('skip_reasons', [])}"
            )
        elif name == "train" and r:
            lines.append(
                f"   {r['arch']}, batch {r['batch_size']}, {r['precision']}: {r['synthetic_samples_per_s']:.0f} "
                f"samples/s on synthetic tensors, {r['loader_samples_per_s']:.0f} on the loader "
                f"({r['loader_over_synthetic']:.0%}), waiting for data {r['data_wait']:.0%}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
