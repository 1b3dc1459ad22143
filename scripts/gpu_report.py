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
installs them with DALI. Without that piece the peers section says it skipped them. A rehearsal copies the wheels
staged for its own Python into $CK and sources install-staged.sh again (`--stage-peers DIR --python 3.11`; the
rehearsal commands in docs/benchmarks.md).

The check runs these sections in order, each in a process group of its own, ended whole (its children too) when
its time bound passes; each section's result goes into OUT/gpu_report.json as soon as it ends, its output into
OUT/<section>.log. A section is `ok`, `skipped: WHY` (it could not run here: no GPU, no peer wheels, no time left)
or `failed: WHY`; only a failed one fails the check (exit 1).

    parity      GPU-vs-CPU (and Pillow) decode of the same unaugmented clips: max and mean absolute difference, of
                RGB and of luma, for the CUDA decoder alone (hw_decoder_load 0) and the hardware engine (1)
    tests       `pytest -m gpu tests/test_gpu.py`: the GPU path's tests (their CPU twins run in CI)
    sweep       the DALI loader at 4/8/16 frames per JPEG, run each way of `SWEEP` (how its threads and DALI's
                operator concurrency are set, the hardware decoder's share), the JPEG variants (quality and Huffman
                tables, 8 frames per JPEG, the default way) after the first way, then its host side alone: two-view
                samples/s and CPU cores busy; per pipeline its decoders and threads, the threads the process
                holds, its build time and GPU memory. A way that sets what DALI reads once per process runs in a
                process of its own
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
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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

BUDGET_S = 450.0  # the whole check: a lent GPU gives 15 minutes, its start and the carried pieces included
# the bound of each (GPU), in the order they run: what only a GPU can show first
SECTIONS = {"parity": 30.0, "tests": 70.0, "sweep": 165.0, "train": 60.0, "dataloader": 35.0, "peers": 75.0}
REHEARSAL_SLOWER = 3.0  # --quick --device cpu: the bounds stretched, a shared 2-core machine being what rehearses
GRACE_S = 5.0  # between asking a timed-out section's processes to end (SIGTERM) and killing them
FRAMES_PER_JPEG = (4, 8, 16)
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
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # sweep: one way, in a process of its own
    parser.add_argument("--stage-peers", type=Path, metavar="DIR", help="download the peer loaders' wheels into DIR")
    parser.add_argument("--python", default="3.12", help="--stage-peers: for this Python (the GPU machine's: 3.12)")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
    elif args.stage_peers:
        stage_peers(args.stage_peers, args.python)
    elif args.data is None or args.out is None:
        parser.error("pass --prepare DIR, or --data DIR and --out OUT")
    elif args.variant:
        sweep_variant(args, next(v for v in SWEEP if v.name == args.variant))
    elif args.section:
        result = globals()[f"section_{args.section}"](args)
        (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        run_all(args)


# -- here: the data to carry -------------------------------------------------------------------------------------


def prepare(out: Path, classes: int = 2, videos_per_class: int = 2) -> None:
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


def _data_name(data: int | str) -> str:
    """The prepared set: DIR/fpjN for N frames per JPEG, or a JPEG variant's DIR/NAME."""
    return data if isinstance(data, str) else f"fpj{data}"


def _data(args: argparse.Namespace, data: int | str = 8) -> str:
    return str(args.data / _data_name(data))


def section_parity(args: argparse.Namespace) -> dict:
    """The CUDA decoder alone (hw_decoder_load 0) and the hardware engine (1) against the CPU and Pillow."""
    from dali_skd.commands.bench import decode_parity

    devices = ["cuda", "cpu"] if args.device == "cuda" else ["cpu"]
    return decode_parity(_data(args), devices, split="train", videos=4, hw_loads=(0.0, 1.0))


def _decoders(fpj: int) -> int:
    """The training pipeline's JPEG decoders (two views) at `fpj` frames per JPEG, for the default clip."""
    from dali_skd.config import ClipConfig
    from dali_skd.data.clips import strip_slots

    return 2 * strip_slots(ClipConfig().length, fpj)


def _cores_split(decoders: int) -> int:
    from dali_skd.runtime import local_cpu_share

    return max(1, local_cpu_share() // decoders)


@dataclass(frozen=True)
class Variant:
    """One way of running the DALI loader in the sweep: its loader settings (from the pipeline's decoders), and
    what it sets in the environment, which gives it a process of its own (DALI reads DALI_EXEC2_NUM_THREADS once
    per process, at its first pipeline)."""

    name: str
    what: str
    loader: Callable[[int], dict] = lambda decoders: {}
    env: Callable[[int], dict[str, str]] = lambda most_decoders: {}


def _executor_threads(most_decoders: int) -> dict[str, str]:
    from dali_skd.data.loader import EXECUTOR_THREADS, executor_threads_needed

    return {EXECUTOR_THREADS: str(executor_threads_needed(most_decoders, 2))}


# the ways the sweep runs the loader, in order, each at every FRAMES_PER_JPEG: what the first GPU run decides by
SWEEP = (
    Variant("undivided", "the default: the decoders take turns (DALI's concurrency backend), each with the cores"),
    Variant(
        "split", "the cores split among the decoders, which take turns all the same (before issue 24)",
        lambda decoders: {"threads": _cores_split(decoders)},
    ),
    Variant(
        "full", "concurrency full: the decoders side by side on the cores split, executor threads for all of them",
        lambda decoders: {"concurrency": "full"}, _executor_threads,
    ),
    Variant("hw1", "the default, every strip to the hardware JPEG decoder", lambda decoders: {"hw_decoder_load": 1.0}),
)  # fmt: skip
ROW_S = 10.0  # what a row costs beyond its measuring time (warm-up, the pipeline built): one is not started later


def section_sweep(args: argparse.Namespace) -> dict:
    """Every way of SWEEP at every frames per JPEG, then the host side alone; each row written as it ends. A row
    that fails is recorded with its error and the others go on; those with no time left are named."""
    started = time.monotonic()
    (args.out / "sweep.json").unlink(missing_ok=True)
    most_decoders = max(_decoders(fpj) for fpj in FRAMES_PER_JPEG)
    for variant in SWEEP:
        env = variant.env(most_decoders)
        if not env:
            sweep_variant(args, variant, started)
            continue
        left = _time_left(args, started)
        command = [sys.executable, "-u", __file__, "--variant", variant.name, *_common(args), "--limit", f"{left:.0f}"]
        # not a session of its own: it ends with the section's process group
        code = subprocess.run(command, env={**os.environ, **env}, check=False).returncode
        if code != 0:  # its rows that did not come: failed, not left out for time
            measured = {row["data"] for row in _rows(args.out) if row["variant"] == variant.name}
            for data in _sets(variant):
                if _data_name(data) not in measured:
                    _write_row(args, _failed_row(variant.name, data, f"exit {code}"))
    seconds, _ = _sweep_sizes(args)
    if _time_left(args, started) > 3 * seconds + ROW_S:  # the host row measures twice, then checks a first pass
        _add_row(args, lambda: _sweep_row(args, "host", "host", 8, {}), "host", 8)
    rows = _rows(args.out)
    done = {(row["variant"], row["data"]) for row in rows}
    ways = [(v.name, _data_name(data)) for v in SWEEP for data in _sets(v)] + [("host", "fpj8")]
    result = {
        "rows": rows,
        "ways": {v.name: v.what for v in SWEEP},
        "not_run": [f"{name} {data}: no time left" for name, data in ways if (name, data) not in done],
    }
    errors = [f"{row['variant']} {row['data']}" for row in rows if "error" in row]
    return result | ({"status": f"failed: {', '.join(errors)} (sweep.log)"} if errors else {})


def _sets(variant: Variant) -> list[int | str]:
    """The prepared sets a way runs on: every frames per JPEG; the first way, the JPEG variants too."""
    return [*FRAMES_PER_JPEG, *(JPEG_VARIANTS if variant.name == SWEEP[0].name else ())]


def sweep_variant(args: argparse.Namespace, variant: Variant, started: float | None = None) -> None:
    """One way's rows, on each of its sets, while time is left (`args.limit` from `started`)."""
    started = started if started is not None else time.monotonic()
    seconds, _ = _sweep_sizes(args)
    for data in _sets(variant):
        if _time_left(args, started) >= seconds + ROW_S:
            settings = variant.loader(_decoders(data if isinstance(data, int) else 8))
            _add_row(args, lambda data=data, settings=settings: _sweep_row(args, "dali", variant.name, data, settings),
                     variant.name, data)  # fmt: skip


def _failed_row(variant: str, data: int | str, error: str) -> dict:
    return {"variant": variant, "data": _data_name(data), "error": error}


def _add_row(args: argparse.Namespace, measure: Callable[[], dict], variant: str, data: int | str) -> None:
    """Appends a row to OUT/sweep.json: its figures, or the error that ended it (its traceback in the log)."""
    try:
        row = measure()
    except Exception as e:  # one way failing is its row's end, not the sweep's
        traceback.print_exc()
        row = _failed_row(variant, data, f"{type(e).__name__}: {str(e)[:300]}")
    _write_row(args, row)


def _write_row(args: argparse.Namespace, row: dict) -> None:
    rows = [*_rows(args.out), row]
    (args.out / "sweep.json").write_text(json.dumps({"rows": rows, "partial": True}, indent=2) + "\n")


def _sweep_sizes(args: argparse.Namespace) -> tuple[float, int]:
    return (2.0, 16) if args.quick else (5.0, 64)


def _time_left(args: argparse.Namespace, started: float) -> float:
    return (args.limit or SECTIONS["sweep"]) - (time.monotonic() - started)


def _rows(out: Path) -> list[dict]:
    path = out / "sweep.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _sweep_row(args: argparse.Namespace, loader: str, variant: str, data: int | str, settings: dict) -> dict:
    from dali_skd.commands.bench import BenchConfig, run_bench
    from dali_skd.config import LoaderConfig

    seconds, batch = _sweep_sizes(args)
    config = LoaderConfig(**settings)
    cfg = BenchConfig(
        data=_data(args, data), device=args.device, loaders=loader, batch_size=batch, seconds=seconds, repeats=3,
        rounds=1, loader=config,
    )  # fmt: skip
    report = run_bench(cfg)
    shards = {k: report[k] for k in ("frames_per_jpeg", "quality", "optimize_huffman")}
    return {"loader": loader, "variant": variant, "data": _data_name(data), **shards,
            "hw_decoder_load": config.hw_decoder_load, "concurrency": config.concurrency,
            **report["loaders"][loader]}  # fmt: skip


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
        seconds=6.0 if args.quick else 30.0, repeats=3,
    )  # fmt: skip
    return run_bench(cfg)["train"]


PEER_FIGURES = ("loaders", "skipped", "videos", "rounds", "augment")


def section_peers(args: argparse.Namespace) -> dict:
    """The DALI loader against DataLoaders over the re-encoded videos (--prepare made them), crop and flip only;
    rounds and seconds cut to fit `args.limit`, each round's figures written as it ends. Skipped when no peer
    library loads here (their wheels did not travel)."""
    from dali_skd.commands.bench import BenchAugmentConfig, BenchConfig, run_bench
    from dali_skd.data.peers import PEERS, peer_problem

    problems = {name: peer_problem(name) for name in PEERS}
    if all(problems.values()):
        why = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        return {"status": f"skipped: no peer loader loads here ({why})", "skipped": problems}
    loaders = ["dali", *PEERS]
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
        figures = {k: report[k] for k in PEER_FIGURES if k in report}
        (args.out / "peers.json").write_text(json.dumps({**figures, "partial": True}, indent=2) + "\n")

    report = run_bench(cfg, on_round=partial)
    return {k: report[k] for k in PEER_FIGURES if k in report} | {"seconds": seconds}


def section_tests(args: argparse.Namespace) -> dict:
    """The GPU tests, in a pytest run of their own; their counts, and each failure's first lines, from its JUnit
    XML. Every test skipped (no GPU here): skipped."""
    import xml.etree.ElementTree as ElementTree

    xml = args.out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    done = subprocess.run([*command, "tests/test_gpu.py"], cwd=REPO, check=False)
    suite = ElementTree.parse(xml).getroot().find("testsuite") if xml.exists() else None
    if suite is None:
        return {"status": f"failed: pytest exit {done.returncode}, no results (tests.log)"}
    counts: dict = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["skip_reasons"] = sorted({e.get("message", "") for e in suite.iter("skipped")})
    counts["failed"] = [
        {"test": case.get("name", "?"), "message": (problem.get("message") or problem.text or "")[:400]}
        for case in suite.iter("testcase")
        for problem in [*case.iter("failure"), *case.iter("error")]
    ]
    if counts["failed"]:
        names = ", ".join(f["test"] for f in counts["failed"])
        return counts | {"status": f"failed: {len(counts['failed'])} of {counts['tests']} GPU tests: {names}"}
    if counts["tests"] == 0:
        return counts | {"status": "failed: no GPU test collected"}
    if counts["skipped"] == counts["tests"]:
        return counts | {"status": f"skipped: {'; '.join(counts['skip_reasons'])}"}
    return counts


# -- running them --------------------------------------------------------------------------------------------------


def _common(args: argparse.Namespace) -> list[str]:
    """What every section's process is told: the data, the output, the device, the rehearsal's sizes."""
    return ["--data", str(args.data), "--out", str(args.out), "--device", args.device,
            *(["--quick"] if args.quick else [])]  # fmt: skip


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
        limit = min(bound * stretch, deadline - time.monotonic() - GRACE_S)
        if limit > 10:
            report["sections"][name] = run_section(name, args, limit)
        else:
            report["sections"][name] = {"status": f"skipped: no time left of the check's {BUDGET_S * stretch:.0f} s"}
        save()
        print(f"== {name}: {report['sections'][name]['status']}", flush=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    save()
    print(table(report))
    failed = [name for name, entry in report["sections"].items() if entry["status"].startswith("failed")]
    if failed:
        sys.exit(f"the GPU check failed: {', '.join(failed)} (OUT/gpu_report.json, OUT/<section>.log)")


def run_section(name: str, args: argparse.Namespace, limit: float) -> dict:
    """One section in a process group of its own, ended after `limit` seconds; what it wrote is kept either way.
    Its status: the one its result gives (`skipped: ...`, `failed: ...`), else ok; failed when it crashed or ran
    out of time."""
    command = [sys.executable, "-u", __file__, "--section", name, *_common(args), "--limit", f"{limit:.0f}"]
    log = args.out / f"{name}.log"
    started = time.monotonic()
    code = run_bounded(command, log, limit)
    entry: dict = {"seconds": round(time.monotonic() - started, 1), "log": log.name}
    result_file = args.out / f"{name}.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if code is None:
        status = f"failed: timed out after {limit:.0f} s (its processes ended)"
    elif code != 0:
        last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()), "")
        status = f"failed: exit {code}: {last.strip()[:200]}"
    else:
        status = result.pop("status", "ok")
    entry = {"status": status, **entry}
    if result:
        entry["result"] = result
    if status.startswith("failed"):
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    return entry


def run_bounded(command: list[str], log: Path, limit: float) -> int | None:
    """`command` in a session (so a process group) of its own, its output into `log`: its exit code, or None when
    it ran past `limit` seconds. Either way every process left in its group then ends (SIGTERM, then SIGKILL after
    GRACE_S): a section's children (pytest, DataLoader workers, a sweep's process) go with it, which a plain
    timeout, killing only the section's own process, would leave running into the next sections."""
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            end_group(process)
    return code


def end_group(process: subprocess.Popen) -> None:
    """Ends every process of `process`'s group (its leader first asked, then killed), and reaps the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # none left
        waited = time.monotonic() + (GRACE_S if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < waited and _group_alive(process):
            time.sleep(0.05)
        if not _group_alive(process):
            break
    process.wait()


def _group_alive(process: subprocess.Popen) -> bool:
    """Whether a process of the group still runs (not only a zombie, whose parent has yet to reap it)."""
    process.poll()  # reaps the leader once it has ended
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == process.pid and fields[0] not in ("Z", "X"):
            return True
    return False


def machine() -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(),
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
    load = " / ".join(f"{a[0]:.1f}" for a in (m.get("load_average_at_start"), m.get("load_average_at_end")) if a)
    lines = [
        f"{m['gpu'] or 'no GPU'}, {m['cpu_cores']} CPU cores, torch {m['torch']}, DALI {m['dali']}, {m['date']}"
        f"{f', load average {load} (start / end)' if load else ''}"
    ]
    for name, entry in report["sections"].items():
        lines.append(f"-- {name}: {entry['status']} ({entry.get('seconds', 0):.0f} s)")
        lines += [f"   {line}" for line in SECTION_LINES.get(name, lambda r: [])(entry.get("result") or {})]
    return "\n".join(lines)


def _parity_lines(r: dict) -> list[str]:
    return [
        f"{pair}: max {d['max_abs']:.1f}, mean {d['mean_abs']:.2f} levels; luma max {d['luma_max_abs']:.1f}, mean "
        f"{d['luma_mean_abs']:.2f}"
        for pair, d in r.get("pairs", {}).items()
    ]


def _tests_lines(r: dict) -> list[str]:
    if "tests" not in r:
        return []
    lines = [f"{r['tests']} tests: {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped "
             f"{r.get('skip_reasons', [])}"]  # fmt: skip
    return lines + [f"{f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}" for f in r.get("failed", [])]


def _sweep_lines(r: dict) -> list[str]:
    lines = [
        "way         fpj  jpeg     hw load  samples/s  cores busy  CPU us/sample  decoders x threads  threads  build s"
        "  GPU MiB"
    ]
    for w in r.get("rows", []):
        if "error" in w:
            lines.append(f"{w['variant']:<11}{w['data']:>8}  failed: {w['error']}")
            continue
        jpeg = f"q{w['quality']} {'opt' if w['optimize_huffman'] else 'std'}"
        pipeline = ""
        if "decoders" in w:
            pipeline = f"{w['decoders']:>11} x {w['dali_threads']:<6}{w.get('process_threads', 0):>9}"
            memory = f"{w['device_memory_mib']:>9.0f}" if "device_memory_mib" in w else f"{'-':>9}"
            pipeline += f"{w['pipeline_build_s']:>9.1f}{memory}"
        lines.append(
            f"{w['variant']:<11}{w['frames_per_jpeg']:>4}  {jpeg:<8}{w['hw_decoder_load']:>7.2f}"
            f"{w['samples_per_s']:>11.0f}"
            f"{w['cpu_cores_busy'] or 0:>12.1f}{w['cpu_us_per_sample']:>15.0f}{pipeline}"
        )
        if "check_every_read_us_per_sample" in w:
            lines.append(
                f"strip checks: every read {w['check_every_read_us_per_sample']:+.0f} us/sample over first use; a "
                f"first pass {w['first_pass_check_us_per_video']:.0f} us/video"
            )
    lines += [f"{name}: {what}" for name, what in r.get("ways", {}).items()]
    return lines + [f"not run: {why}" for why in r.get("not_run", [])]


def _peers_lines(r: dict) -> list[str]:
    if "loaders" not in r:
        return []
    lines = [f"{r['augment']}, {r.get('seconds', 0):.0f} s a round; samples/s (each round), x dali, CPU us/sample, "
             "disk/video"]  # fmt: skip
    for loader, f in r["loaders"].items():
        rounds = " ".join(f"{x:.0f}" for x in f["rounds"])
        ratio = f"{f['ratio_to_dali']:.2f}" if "ratio_to_dali" in f else "-"
        lines.append(
            f"{loader:<11}{f['samples_per_s']:>7.0f} ({rounds}) {ratio:>6}{f['cpu_us_per_sample']:>9.0f}"
            f"{f['disk_bytes_per_video'] / 1e3:>8.0f} kB  {f['reads']}"
        )
    return lines + [f"{loader:<11}skipped: {why}" for loader, why in r.get("skipped", {}).items()]


def _train_lines(r: dict) -> list[str]:
    if "arch" not in r:
        return []
    return [
        f"{r['arch']}, batch {r['batch_size']}, {r['precision']}: {r['synthetic_samples_per_s']:.0f} samples/s on "
        f"synthetic tensors, {r['loader_samples_per_s']:.0f} on the loader ({r['loader_over_synthetic']:.0%}), "
        f"waiting for data {r['data_wait']:.0%}"
    ]


def _dataloader_lines(r: dict) -> list[str]:
    return [f"{r['samples_per_s']:.0f} samples/s, {r['cpu_cores_busy'] or 0:.1f} cores busy"] if r else []


SECTION_LINES = {"parity": _parity_lines, "tests": _tests_lines, "sweep": _sweep_lines, "train": _train_lines,
                 "dataloader": _dataloader_lines, "peers": _peers_lines}  # fmt: skip


if __name__ == "__main__":
    main()
