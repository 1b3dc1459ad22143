"""What each JPEG setting costs and gives: disk, pixels, loader speed (docs/benchmarks.md, "Shard settings").

    python scripts/shard_settings.py --videos VIDEOS --out OUT [--rounds 3 --seconds 10 --batch-size 32]

VIDEOS is a class-folder tree (VIDEOS/<class>/<video>). Every video is preprocessed once per setting, by
`preprocess` itself (`--dataset folder`, into OUT/data/<setting>): JPEG quality 50/65/75/90 x frames per JPEG
4/8/16 x Huffman tables standard or optimised, and vp9 at its default CRF. Also, by preprocess's own transcoding,
an h264 mp4 at the same short side (x264 CRF 23, the form other loaders keep: `cli.py bench`'s peers).

For each setting:
- bytes of shards (tar headers and metadata included) per video and per second of video, and their ratio to the
  source files and to the h264 mp4s;
- PSNR of the stored frames (decoded by Pillow's libjpeg-turbo, as DALI's CPU decoder does; vp9 and h264 by ffmpeg)
  against the frames ffmpeg decodes from the source at the same short side and frame rate, before any encoding:
  a video's PSNR from its mean squared error over all its frames and channels, the mean over the videos reported;
- the DALI loader on the CPU (`cli.py bench --loaders dali --augment.policy crop-flip`, 2 threads): two-view
  samples/s and CPU microseconds per sample. The settings take turns within each of `--rounds` rounds, so each
  round's ratio to the old default (quality 90, 8 frames, standard tables) is measured under the same load; the
  median over rounds is reported, with the machine's load average.

OUT/table.json holds every figure, OUT/table.md the table and OUT/table.png its plot. A run that stops can be
started again: finished preprocessing is kept (measurements are redone). `--plot PNG TABLE.json ...` draws the
plots of several tables into one figure (docs/shard_settings.png).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dali_skd.commands.bench import BenchAugmentConfig, BenchConfig, run_bench
from dali_skd.config import LoaderConfig, PreprocessConfig
from dali_skd.format import SampleMeta, ShardManifest, split_member_name
from preprocess.run import find_ffmpeg, run_preprocess
from preprocess.transcode import DEFAULT_QUALITY, TranscodeSettings, ffmpeg_command, transcode

QUALITIES = (50, 65, 75, 90)
FRAMES_PER_JPEG = (4, 8, 16)
SHORT_SIDE = 128
OLD_DEFAULT = "q90-fpj8-std"  # the defaults before this table (quality 90, 8 frames per JPEG, standard tables)


@dataclass(frozen=True)
class Setting:
    format: str  # jpeg or vp9
    quality: int  # JPEG quality, or VP9's CRF
    frames_per_jpeg: int = 0
    optimize_huffman: bool = False

    @property
    def name(self) -> str:
        if self.format == "vp9":
            return f"vp9-crf{self.quality}"
        return f"q{self.quality}-fpj{self.frames_per_jpeg}-{'opt' if self.optimize_huffman else 'std'}"


SETTINGS = [
    *(Setting("jpeg", q, fpj, opt) for q in QUALITIES for fpj in FRAMES_PER_JPEG for opt in (False, True)),
    Setting("vp9", DEFAULT_QUALITY["vp9"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, help="class-folder tree VIDEOS/<class>/<video>")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, nargs="+", metavar=("PNG", "TABLE"), help="draw tables' plots into PNG")
    parser.add_argument("--rounds", type=int, default=3, help="loader rounds, every setting once in each")
    parser.add_argument("--seconds", type=float, default=10.0, help="loader measuring time per setting and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-loader", action="store_true", help="disk and pixels only")
    args = parser.parse_args()
    if args.plot:
        plot([json.loads(table.read_text()) for table in args.plot[1:]], args.plot[0])
        return
    if args.videos is None or args.out is None:
        parser.error("pass --videos VIDEOS --out OUT, or --plot PNG TABLE.json ...")

    manifests = {s.name: prepare(s, args) for s in SETTINGS}
    # the videos preprocess took (a folder may hold other files)
    sources = sorted(args.videos / source for source in stored_videos(args.out / "data" / OLD_DEFAULT))
    reference = {str(p.relative_to(args.videos)): reference_frames(p) for p in sources}
    h264 = h264_videos(sources, args.videos)
    rows = {name: disk_and_pixels(name, m, args.out / "data" / name, reference, h264) for name, m in manifests.items()}
    rows["h264 mp4"] = h264_row(h264, reference, manifests[OLD_DEFAULT])
    if not args.no_loader:
        measure_loaders(rows, args)
    report = {
        "videos": str(args.videos),
        "sources": len(sources),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "rows": rows,
    }
    (args.out / "table.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "table.md").write_text(markdown(report) + "\n")
    plot([report], args.out / "table.png")
    print(markdown(report))
    print(f"wrote {args.out}/table.json, table.md, table.png")


def prepare(setting: Setting, args: argparse.Namespace) -> ShardManifest:
    """The setting's shards of every video (all of them in one split: `folder`'s test split is kept too)."""
    out = args.out / "data" / setting.name
    if not (out / "manifest.json").is_file():
        cfg = PreprocessConfig(
            dataset="folder", root=str(args.videos), out=str(out), format=setting.format, quality=setting.quality,
            frames_per_jpeg=setting.frames_per_jpeg or 8, optimize_huffman=setting.optimize_huffman,
            workers=args.workers, resume=out.exists(),
        )  # fmt: skip
        print(run_preprocess(cfg, progress=False).format(), flush=True)
    return ShardManifest.load(out)


def reference_frames(source: Path) -> np.ndarray:
    """The source's frames as ffmpeg hands them to the JPEG encoder: short side 128, the source's frame rate, RGB."""
    settings = TranscodeSettings(find_ffmpeg(None), "jpeg", SHORT_SIDE, None, 90, 8)
    data = subprocess.run(ffmpeg_command(source, settings, "pipe:"), capture_output=True, check=True).stdout
    header_end = data.index(b"\n255\n") + 5
    width, height = map(int, data[3 : header_end - 5].split())
    frame = header_end + width * height * 3
    frames = np.frombuffer(data, np.uint8).reshape(-1, frame)[:, header_end:]
    return frames.reshape(-1, height, width, 3)


def decoded_video(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A webm's or mp4's frames decoded by ffmpeg to RGB (from a file: an mp4's index may come last)."""
    with tempfile.NamedTemporaryFile() as file:
        file.write(data)
        file.flush()
        command = [find_ffmpeg(None), "-v", "error", "-i", file.name, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
        raw = subprocess.run(command, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, *shape[1:])


def stored_videos(data: Path) -> dict[str, tuple[SampleMeta, bytes]]:
    """Every sample of a dataset folder: its metadata and media, by source path."""
    found: dict[str, tuple[SampleMeta, bytes]] = {}
    for shard in sorted(data.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = split_member_name(member.name)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, parts in members.items():
            meta = SampleMeta.from_json(parts["json"], f"{shard}:{key}")
            found[meta.source] = (meta, parts.get("jpgs") or parts["webm"])
    return found


def decoded_strips(meta: SampleMeta, media: bytes) -> np.ndarray:
    frames = []
    for a, b in itertools.pairwise(meta.strip_offsets):
        strip = np.asarray(Image.open(io.BytesIO(media[a:b])).convert("RGB"))
        frames.append(strip.reshape(-1, meta.height, meta.width, 3))
    return np.concatenate(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))  # a decoder may drop or add a frame at the end; none did here (the counts are checked)
    mse = float(np.mean((a[:n].astype(np.float32) - b[:n].astype(np.float32)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")


def h264_videos(sources: list[Path], root: Path) -> dict[str, bytes]:
    settings = TranscodeSettings(find_ffmpeg(None), "h264", SHORT_SIDE, None, DEFAULT_QUALITY["h264"], 0)
    return {str(p.relative_to(root)): transcode(p, settings).media for p in sources}


def disk_and_pixels(
    name: str, manifest: ShardManifest, data: Path, reference: dict[str, np.ndarray], h264: dict[str, bytes]
) -> dict:
    splits = manifest.splits.values()
    shard_bytes = sum(s.bytes for info in splits for s in info.shards)
    videos = sum(info.samples for info in splits)
    seconds = sum(info.seconds or 0 for info in splits)
    source_bytes = sum(info.source_bytes or 0 for info in splits)
    psnrs, frame_counts = [], []
    for source, (meta, media) in stored_videos(data).items():
        ref = reference[source]
        shape = (0, meta.height, meta.width, 3)
        frames = decoded_strips(meta, media) if meta.format == "jpeg" else decoded_video(media, shape)
        frame_counts.append(len(frames) == len(ref))
        psnrs.append(psnr(frames, ref))
    return {
        "format": manifest.format,
        "quality": manifest.quality,
        "frames_per_jpeg": manifest.frames_per_jpeg,
        "optimize_huffman": manifest.optimize_huffman,
        "videos": videos,
        "seconds": seconds,
        "bytes": shard_bytes,
        "bytes_per_video": shard_bytes / videos,
        "bytes_per_second": shard_bytes / seconds,
        "ratio_to_sources": shard_bytes / source_bytes,
        "ratio_to_h264": shard_bytes / sum(len(v) for v in h264.values()),
        "psnr_db": statistics.mean(psnrs),
        "frame_counts_match": all(frame_counts),
    }


def h264_row(h264: dict[str, bytes], reference: dict[str, np.ndarray], old: ShardManifest) -> dict:
    total = sum(len(v) for v in h264.values())
    seconds = sum(info.seconds or 0 for info in old.splits.values())
    sources = sum(info.source_bytes or 0 for info in old.splits.values())
    psnrs = [psnr(decoded_video(data, reference[s].shape), reference[s]) for s, data in h264.items()]
    return {
        "format": "h264",
        "quality": DEFAULT_QUALITY["h264"],
        "videos": len(h264),
        "seconds": seconds,
        "bytes": total,
        "bytes_per_video": total / len(h264),
        "bytes_per_second": total / seconds,
        "ratio_to_sources": total / sources,
        "ratio_to_h264": 1.0,
        "psnr_db": statistics.mean(psnrs),
    }


def measure_loaders(rows: dict[str, dict], args: argparse.Namespace) -> None:
    """`cli.py bench --loaders dali` on each setting's shards, the settings taking turns in each round."""
    rates: dict[str, list[dict]] = {s.name: [] for s in SETTINGS}
    loads = []
    for round_number in range(args.rounds):
        order = [s.name for s in SETTINGS]
        if round_number % 2:
            order.reverse()  # a slow drift of the load falls on each setting alike
        for name in order:
            loads.append(os.getloadavg()[0])
            cfg = BenchConfig(
                data=str(args.out / "data" / name), device="cpu", loaders="dali", batch_size=args.batch_size,
                seconds=args.seconds, repeats=3, rounds=1, augment=BenchAugmentConfig(policy="crop-flip"),
                loader=LoaderConfig(threads=2),
            )  # fmt: skip
            rates[name].append(run_bench(cfg)["loaders"]["dali"])
    for name, runs in rates.items():
        old = rates[OLD_DEFAULT]
        rows[name]["loader"] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
            "cpu_us_per_sample": statistics.median(r["cpu_us_per_sample"] for r in runs),
            "rounds": [r["samples_per_s"] for r in runs],
            "ratio_to_old_default": statistics.median(
                r["samples_per_s"] / o["samples_per_s"] for r, o in zip(runs, old, strict=True)
            ),
            "cpu_ratio_to_old_default": statistics.median(
                r["cpu_us_per_sample"] / o["cpu_us_per_sample"] for r, o in zip(runs, old, strict=True)
            ),
        }
    rows[OLD_DEFAULT]["loader"]["load_average"] = [min(loads), statistics.median(loads), max(loads)]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def markdown(report: dict) -> str:
    rows = report["rows"]
    old = rows[OLD_DEFAULT]
    lines = [
        "| setting | bytes per video-second | per video | x old default | x sources | x h264 mp4 | PSNR dB | "
        "loader samples/s | x old default | CPU us/sample | x old default |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        loader = r.get("loader")
        speed = (
            f"{loader['samples_per_s']:.1f} | {loader['ratio_to_old_default']:.2f} | {loader['cpu_us_per_sample']:,.0f}"
            f" | {loader['cpu_ratio_to_old_default']:.2f}"
            if loader
            else "| | |"
        )
        lines.append(
            f"| {name} | {r['bytes_per_second'] / 1e3:,.1f} kB | {r['bytes_per_video'] / 1e3:,.0f} kB | "
            f"{r['bytes'] / old['bytes']:.2f} | {r['ratio_to_sources']:.2f} | {r['ratio_to_h264']:.1f} | "
            f"{r['psnr_db']:.1f} | {speed} |"
        )
    if (loader := old.get("loader")) and "load_average" in loader:
        low, median, high = loader["load_average"]
        lines.append(
            f"\nLoad average (1 min) while the loader was measured: {low:.1f} to {high:.1f}, median {median:.1f}."
        )
    return "\n".join(lines)


def plot(reports: list[dict], path: Path) -> None:
    """Per table (a row each): disk against PSNR, and against the loader's CPU time per sample relative to the old
    default (load on a shared machine moves samples/s far more than it moves CPU time per sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    colours = dict(zip(QUALITIES, ("tab:red", "tab:orange", "tab:green", "tab:blue"), strict=True))
    markers = {4: "s", 8: "o", 16: "^"}
    fig, axes = plt.subplots(len(reports), 2, figsize=(13, 4.6 * len(reports)), squeeze=False)
    for report, row in zip(reports, axes, strict=True):
        for ax, key in zip(row, ("psnr", "cpu"), strict=True):
            if key == "cpu" and not any("loader" in r for r in report["rows"].values()):
                ax.axis("off")
                ax.text(0.5, 0.5, "loader not measured on this set", ha="center", transform=ax.transAxes)
                continue
            for name, r in report["rows"].items():
                if key == "cpu" and "loader" not in r:
                    continue
                x = r["bytes_per_second"] / 1e3
                y = r["psnr_db"] if key == "psnr" else r["loader"]["cpu_ratio_to_old_default"]
                if r["format"] != "jpeg" and key == "cpu":  # off the JPEG settings' scale: said in words
                    ax.text(0.98, 0.03, f"{name}: {y:.1f}x", transform=ax.transAxes, ha="right", fontsize=8)
                if r["format"] != "jpeg":
                    if key == "psnr":
                        ax.scatter(x, y, c="black", marker="x", s=46)
                        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
                    continue
                colour = colours[r["quality"]]
                ax.scatter(
                    x, y, edgecolors=colour, facecolors=colour if r["optimize_huffman"] else "none", s=46,
                    marker=markers[r["frames_per_jpeg"]],
                )  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel("shard kB per second of video (log scale)")
            ax.set_ylabel(
                "PSNR against the source at short side 128 (dB)"
                if key == "psnr"
                else "loader CPU time per sample, x old default"
            )
            ax.set_title(f"{report['videos']}: {report['sources']} videos, {report['date']}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f"quality {q}") for q, c in colours.items()]
    handles += [
        plt.Line2D([], [], color="grey", marker=m, ls="", label=f"{f} frames per JPEG") for f, m in markers.items()
    ]
    handles += [plt.Line2D([], [], color="grey", marker="o", ls="", mfc="none", label="standard Huffman (hollow)")]
    axes[0][0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
