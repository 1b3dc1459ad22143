"""dali-skd's command line. Thin: each command parses its flags into a config and calls one function.

python cli.py demo                      the built-in synthetic dataset, end to end
python cli.py preprocess --dataset ucf101 --root UCF-101 --splits-dir ucfTrainTestlist --out data/ucf101
python cli.py preprocess verify data/ucf101    every shard still what preprocess wrote? (after a copy)
python cli.py train --data data/ucf101 --out runs/ucf101-skd
python cli.py eval --data data/ucf101 --checkpoint runs/ucf101-skd/best.pt --spatial-crops 3 --json eval.json
python cli.py predict video.mp4 other.avi --checkpoint runs/ucf101-skd/best.pt
python cli.py features --data data/ucf101 --checkpoint runs/ucf101-skd/best.pt --out features/ucf101
python cli.py bench --data data/ucf101
python cli.py preview --data data/ucf101 --out views.png
torchrun --nproc-per-node 8 cli.py train ...

Exit codes: 0 done; 1 an error, printed as one line; 2 a flag click refused; 75 (EX_TEMPFAIL) stopped by a signal
(SIGTERM, SIGINT, SIGUSR1) once the work was saved: run the command again (`train`: with --resume) to continue;
128 + N killed by signal N (a second signal, SIGKILL).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from dali_skd.cli_options import build_config, command_line, config_options
from dali_skd.config import (
    BenchConfig,
    CompareConfig,
    EvalConfig,
    FeaturesConfig,
    PredictConfig,
    PreprocessConfig,
    PreviewConfig,
    TrainConfig,
)
from dali_skd.files import FULL_DISK_ERRNOS, DiskFull, lock_directory
from dali_skd.signals import EXIT_STOPPED, STOP_SIGNALS, Stopped


def user_errors(command):
    """Errors a user can act on are printed as one line (set DALI_SKD_DEBUG=1 for the traceback); a command stopped
    by a signal says where it stopped and exits with EXIT_STOPPED."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Stopped as e:
            if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker ending: torchrun signals the others meanwhile
                for s in STOP_SIGNALS:
                    signal.signal(s, signal.SIG_IGN)
            if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, whose every rank stops
                click.echo(str(e), err=True)
            raise click.exceptions.Exit(EXIT_STOPPED) from e
        except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as e:
            if os.environ.get("DALI_SKD_DEBUG"):
                raise
            raise click.ClickException(str(e)) from e
        except OSError as e:  # a full disk met outside the writes that name their file
            if e.errno not in FULL_DISK_ERRNOS or os.environ.get("DALI_SKD_DEBUG"):
                raise
            raise click.ClickException(str(DiskFull(e.filename or "a file", e))) from e

    return run


def not_in_use(out: str) -> None:
    """Fails at once if another run holds the lock of `out`, before the seconds torch takes to import (the run takes
    the lock itself, rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        with lock_directory(out):
            pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def main() -> None:
    """SKD-SRL: self-knowledge distillation with Siamese representation learning for video action recognition,
    on NVIDIA DALI."""


@main.group(invoke_without_command=True)
@config_options(PreprocessConfig)
@click.pass_context
@user_errors
def preprocess(ctx: click.Context, **options) -> None:
    """Transcode a video dataset into sharded WebDataset tars (see docs/format.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from preprocess.run import run_preprocess

    summary = run_preprocess(build_config(PreprocessConfig, options))
    click.echo(summary.format())


@preprocess.command("merge")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@user_errors
def preprocess_merge(out: str) -> None:
    """Combine the manifests of `--part I/N` runs in OUT into OUT/manifest.json."""
    from preprocess.shards import merge_parts

    manifest = merge_parts(Path(out))
    counts = ", ".join(f"{name} {split.samples} videos" for name, split in manifest.splits.items())
    click.echo(f"merged {out}/manifest.json: {counts}, {manifest.failures} failures")


@preprocess.command("verify")
@click.argument("out")
@click.option("--workers", type=int, default=os.cpu_count(), show_default=True, help="shards checked at once")
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="the JSONL of damaged members  [default: OUT/damaged.jsonl; ./damaged.jsonl for a remote OUT]",
)
@user_errors
def preprocess_verify(out: str, workers: int, report: str | None) -> None:
    """Check every member of every shard of OUT (a folder, http(s) URL prefix or pipe: command, as --data takes):
    checksums, headers, metadata, labels. Lists damaged members in a JSONL; exits 1 if there are any."""
    from preprocess.verify import verify_dataset

    summary = verify_dataset(out, workers, Path(report) if report else None)
    click.echo(summary.format())
    if summary.damaged:
        raise click.ClickException(f"{len(summary.damaged)} problems found in {out}: see {summary.report}")


@preprocess.command("bench")
@click.option("--work-dir", default="runs/preprocess-bench", show_default=True, help="scratch folder")
@click.option("--workers", type=int, default=os.cpu_count(), show_default=True, help="videos at once, both sides")
@click.option("--classes", type=int, default=4, show_default=True, help="synthetic classes")
@click.option("--videos-per-class", type=int, default=10, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="alternating runs; the fastest counts")
@user_errors
def preprocess_bench(work_dir: str, workers: int, classes: int, videos_per_class: int, repeats: int) -> None:
    """Preprocessing videos/s against a plain ffmpeg command line, and bytes per frame of each format."""
    from preprocess.bench import bench_preprocess

    bench_preprocess(Path(work_dir), workers, classes, videos_per_class, repeats=repeats)


@main.command()
@config_options(TrainConfig)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="a saved config.json")
@user_errors
def train(config_file: str | None, **options) -> None:
    """Train a model (one process per GPU under torchrun)."""
    cfg = build_config(TrainConfig, options, config_file)
    not_in_use(cfg.out)
    from dali_skd.training import train as run_train

    run_train(cfg)


@main.command("eval")
@config_options(EvalConfig)
@user_errors
def evaluate(**options) -> None:
    """Clip- and video-level top-1/top-5, per-class top-1 and the confusion matrix of a checkpoint on the held-out
    split; --json also writes the per-video predictions and the confusion matrix as a PNG. The clips are cut as
    the model was trained (--clip-len, --frame-stride, --crop, --input-norm default to the checkpoint's)."""
    from dali_skd.checkpoint import trained_clip_settings
    from dali_skd.evaluation import run_eval

    trained = trained_clip_settings(options["checkpoint"] or EvalConfig().checkpoint)
    run_eval(build_config(EvalConfig, options, defaults={"loader": trained}))


@main.command()
@click.argument("videos", nargs=-1, required=True)
@config_options(PredictConfig)
@user_errors
def predict(videos: tuple[str, ...], **options) -> None:
    """The most probable classes of each video file (any format ffmpeg reads): transcoded as the checkpoint's
    training data was, scored with eval's clips and crops (clip settings from the checkpoint unless given)."""
    from dali_skd.commands.predict import run_predict

    result = run_predict(list(videos), build_config(PredictConfig, options))
    for line in result.errors():
        click.echo(line, err=True)
    if len(result.failed) < len(result.videos):
        click.echo(result.format())
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} of {len(result.videos)} videos could not be predicted")


@main.command()
@config_options(FeaturesConfig)
@user_errors
def features(**options) -> None:
    """The encoder's pooled features of every video of every split, averaged over eval's clips:
    OUT/<split>.npy (float16, videos x channels) and OUT/<split>.jsonl (key, label, source) row for row."""
    from dali_skd.commands.features import run_features

    run_features(build_config(FeaturesConfig, options))


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="where the data, runs and results go")
@click.option(
    "--minutes", type=float, default=6.0, show_default=True, help="time budget for the whole demo on this machine"
)
@click.option("--compare", is_flag=True, help="also train the plain cross-entropy baseline, within the same budget")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the results to this file")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@user_errors
def demo(out: str, minutes: float, compare: bool, json_path: str | None, device: str) -> None:
    """Synthetic dataset -> shards -> SKD-SRL training -> evaluation, planned to end within --minutes."""
    from dali_skd.commands.demo import run_demo

    run_demo(out, compare, json_path, device, minutes)


@main.command()
@config_options(CompareConfig, exclude=("method", "seed", "resume"))
@user_errors
def compare(**options) -> None:
    """The paper's Table II: train every method x seed with the same settings (any train flag), evaluate each
    best checkpoint as eval does, and write OUT/table.md, table.json and compare.png. An interrupted comparison
    started again trains only what is missing."""
    cfg = build_config(CompareConfig, options)
    not_in_use(cfg.train.out)
    from dali_skd.comparison import run_compare

    run_compare(cfg, command_line("compare", options))


@main.command()
@config_options(BenchConfig)
@user_errors
def bench(**options) -> None:
    """Throughput of the DALI loader against the loaders users would write instead (a DataLoader over the same shards;
    decord, PyAV or torchcodec over video files), and of training steps."""
    from dali_skd.commands.bench import run_bench

    run_bench(build_config(BenchConfig, options))


@main.command()
@config_options(PreviewConfig)
@user_errors
def preview(**options) -> None:
    """Draw both views the training loader makes of a few samples, with the augmentations drawn for each, into one
    PNG (--compare-baseline: the DataLoader baseline's views of the same draws under DALI's)."""
    from dali_skd.commands.preview import run_preview

    run_preview(build_config(PreviewConfig, options))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@user_errors
def plot(run_dir: str) -> None:
    """Redraw RUN_DIR/curves.png from its metrics.jsonl."""
    from dali_skd.plot import plot_curves

    click.echo(plot_curves(run_dir))


if __name__ == "__main__":
    sys.exit(main())
