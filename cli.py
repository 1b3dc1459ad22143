"""dali-skd's command line. Thin: each command parses its flags into a config and calls one function.

python cli.py demo                      the built-in synthetic dataset, end to end
python cli.py preprocess --dataset ucf101 --root UCF-101 --splits-dir ucfTrainTestlist --out data/ucf101
python cli.py preprocess verify data/ucf101    every shard still what preprocess wrote? (after a copy)
python cli.py train --data data/ucf101 --out runs/ucf101-skd
python cli.py eval --data data/ucf101 --checkpoint runs/ucf101-skd/best.pt --spatial-crops 3 --json eval.json
python cli.py predict video.mp4 other.avi --checkpoint runs/ucf101-skd/best.pt
python cli.py features --data data/ucf101 --checkpoint runs/ucf101-skd/best.pt --out features/ucf101
python cli.py export --checkpoint runs/ucf101-skd/best.pt --out models/ucf101-skd --format onnx
python cli.py bench --data data/ucf101
python cli.py preview --data data/ucf101 --out views.png
torchrun --nproc-per-node 8 cli.py train ...

Exit codes: 0 done; 1 an error, printed as one line; 2 a flag click refused; 75 (EX_TEMPFAIL) stopped by a signal
(SIGTERM, SIGINT, SIGUSR1) once the work was saved: run the command again (`train`: with --resume) to continue;
128 + N killed by signal N (a second signal, SIGKILL).

Every flag is a field of the command's config: `--name` for a top-level one, `--part.name` for one of a nested part
(`--loader.threads`, `--clip.crop`, `--optim.lr`); `--config FILE` reads settings from a JSON file, under the flags.
The commands are modules of `dali_skd/commands/`, each imported only when it runs.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import click

from dali_skd.cli_options import build_config, command_line, config_options
from dali_skd.config import PreprocessConfig
from dali_skd.errors import DaliSkdError, internal_error, out_of_memory
from dali_skd.files import FULL_DISK_ERRNOS, REFUSED_ERRNOS, DiskFull
from dali_skd.progress import LOG_LEVEL_ENV, LOG_LEVELS, configure_logging
from dali_skd.signals import EXIT_STOPPED, STOP_SIGNALS, Stopped


def user_errors(command):
    """The one boundary of errors. The project's own (`DaliSkdError`), an out-of-memory error (naming the setting to
    lower) and a full disk are printed as one line; anything else is a bug or the machine failing: one line says so
    and where, and names the file its traceback was written to (`errors.internal_error`). Exit code 1 for all;
    DALI_SKD_DEBUG=1 raises them instead, traceback and all. A command stopped by a signal says where it stopped and
    exits with EXIT_STOPPED."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Stopped as e:
            # the work is saved and the process ends with EXIT_STOPPED, which a scheduler requeues: a signal now (a
            # person insisting, torchrun signalling the other workers as one ends) must not turn it into 128 + N
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            if os.environ.get("RANK", "0") == "0":  # one line for a torchrun job, whose every rank stops
                click.echo(str(e), err=True)
            raise click.exceptions.Exit(EXIT_STOPPED) from e
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if os.environ.get("DALI_SKD_DEBUG"):
                raise
            flags = {opt for param in click.get_current_context().command.params for opt in param.opts}
            if (line := out_of_memory(e, flags)) is not None:
                raise click.ClickException(line) from e
            if isinstance(e, DaliSkdError):
                raise click.ClickException(str(e)) from e
            if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:  # met outside the writes that name their file
                raise click.ClickException(str(DiskFull(e.filename or "a file", e))) from e
            if isinstance(e, OSError) and e.errno in REFUSED_ERRNOS:  # a read-only folder, met outside the checks
                raise click.ClickException(
                    f"{e.filename or 'a file'}: {e.strerror}: check that this command may write (or read) it, or "
                    "choose another folder"
                ) from e
            click.echo(internal_error(e), err=True)
            raise click.exceptions.Exit(1) from e

    return run


class ConfigCommand(click.Command):
    """A command whose flags are a config's: an unknown flag that is the last part of one of them is answered with
    it (`--lr`: did you mean `--optim.lr`?), where click's spelling suggestions would not find it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            name = e.option_name.removeprefix("--")
            nested = [opt for p in self.params for opt in p.opts if opt.rsplit(".", 1)[-1] == name]
            e.possibilities = nested or e.possibilities
            raise


def config_flags(cls: type) -> Callable[[Callable], Callable]:
    """A command's flags: a field of `cls` each, and --config FILE."""

    def decorate(command: Callable) -> Callable:
        config_file = click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            help="settings from this JSON file (e.g. a run's config.json, or some of its settings), under the flags",
        )
        return config_options(cls)(config_file(command))

    return decorate


def checkpoint_config(cls: type, options: dict[str, Any], config_file: str | None) -> Any:
    """The config of a command that applies a checkpoint: its `clip` settings default to those the checkpoint was
    trained with (defaults < the checkpoint's < --config < the flags given)."""
    from dali_skd.checkpoint import trained_clip

    checkpoint = build_config(cls, options, config_file).checkpoint
    return build_config(cls, options, config_file, defaults={"clip": trained_clip(checkpoint)})


def config_command(name: str, cls: type, run: Callable[[Any], Any], about: str, build=build_config) -> click.Command:
    """`cli.py NAME`: its flags are `cls`'s fields; it builds the config (`build`) and calls `run` with it."""

    @click.command(name, cls=ConfigCommand, help=about)
    @config_flags(cls)
    @user_errors
    def command(config_file: str | None, **options) -> None:
        run(build(cls, options, config_file))

    return command


def train_command() -> click.Command:
    from dali_skd.commands.train import TrainConfig, run_train

    return config_command("train", TrainConfig, run_train, "Train a model (one process per GPU under torchrun).")


def eval_command() -> click.Command:
    from dali_skd.commands.eval import EvalConfig, run_eval

    about = """Clip- and video-level top-1/top-5, per-class top-1 and the confusion matrix of a checkpoint on the
    held-out split; --json also writes the per-video predictions and the confusion matrix as a PNG. The clips are cut
    as the model was trained (--clip.* default to the checkpoint's)."""
    return config_command("eval", EvalConfig, run_eval, about, build=checkpoint_config)


def predict_command() -> click.Command:
    from dali_skd.commands.predict import PredictConfig, run_predict

    @click.command("predict", cls=ConfigCommand)
    @click.argument("videos", nargs=-1, required=True)
    @config_flags(PredictConfig)
    @user_errors
    def predict(videos: tuple[str, ...], config_file: str | None, **options) -> None:
        """The most probable classes of each video file (any format ffmpeg reads): transcoded as the checkpoint's
        training data was, scored with eval's clips and crops (--clip.* default to the checkpoint's)."""
        run_predict(list(videos), checkpoint_config(PredictConfig, options, config_file))

    return predict


def features_command() -> click.Command:
    from dali_skd.commands.features import FeaturesConfig, run_features

    about = """The encoder's pooled features of every video of every split, averaged over eval's clips:
    OUT/<split>.npy (float16, videos x channels) and OUT/<split>.jsonl (key, label, source) row for row."""
    return config_command("features", FeaturesConfig, run_features, about, build=checkpoint_config)


def compare_command() -> click.Command:
    from dali_skd.commands.compare import CompareConfig, run_compare

    @click.command("compare", cls=ConfigCommand)
    @config_flags(CompareConfig)
    @user_errors
    def compare(config_file: str | None, **options) -> None:
        """The paper's Table II: train every method x seed with the same settings (any train flag but --method and
        --seed; --vary SETTING=V1,V2 adds each method again at each value), evaluate each best checkpoint as eval
        does, and write OUT/table.md, table.json and compare.png: each row's mean and 95% interval over seeds, and
        the verdicts (each method against --reference, skd-srl against self-kd, paired by seed). Best.pt is picked
        on --val-fraction of the training split (0: on test, the paper's protocol). An interrupted comparison
        started again trains only what is missing."""
        run_compare(build_config(CompareConfig, options, config_file), command_line("compare", options, config_file))

    return compare


def demo_command() -> click.Command:
    from dali_skd.commands.demo import DemoConfig, run_demo

    about = "Synthetic dataset -> shards -> SKD-SRL training -> evaluation, planned to end within --minutes."
    return config_command("demo", DemoConfig, run_demo, about)


def bench_command() -> click.Command:
    from dali_skd.commands.bench import BenchConfig, run_bench

    about = """Throughput of the DALI loader against the loaders users would write instead (a DataLoader over the
    same shards; decord, PyAV or torchcodec over video files), and of training steps."""
    return config_command("bench", BenchConfig, run_bench, about)


def preview_command() -> click.Command:
    from dali_skd.commands.preview import PreviewConfig, run_preview

    about = """Draw both views the training loader makes of a few samples, with the augmentations drawn for each, into
    one PNG (--compare-baseline: the DataLoader baseline's views of the same draws under DALI's)."""
    return config_command("preview", PreviewConfig, run_preview, about)


def export_command() -> click.Command:
    from dali_skd.commands.export import ExportConfig, run_export

    about = """A checkpoint as a folder to share: model.safetensors, config.json (architecture, classes, clip settings,
    input normalisation, preprocessing, training settings, evaluation figures) and a README.md model card; --format
    onnx adds model.onnx, checked against PyTorch. eval, predict, features, --init and --teacher take the folder."""
    return config_command("export", ExportConfig, run_export, about)


def plot_command() -> click.Command:
    from dali_skd.commands.plot import run_plot

    @click.command("plot")
    @click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
    @user_errors
    def plot(run_dir: str) -> None:
        """Redraw RUN_DIR/curves.png from its metrics.jsonl."""
        run_plot(run_dir)

    return plot


class Lazy(NamedTuple):
    """A command of `dali_skd/commands/`: the line `cli.py --help` lists it with, and how to build it."""

    summary: str
    build: Callable[[], click.Command]


class Commands(click.Group):
    """The top level: `preprocess`, and the commands of `dali_skd/commands/`, each built (its module imported) only
    when it runs or its own help is shown, so that no command, and not `cli.py --help`, waits for the imports of the
    others (torch, DALI: seconds)."""

    lazy: ClassVar[dict[str, Lazy]] = {
        "train": Lazy("Train a model (one process per GPU under torchrun).", train_command),
        "eval": Lazy("Accuracy, per class and confusion matrix, of a checkpoint on the held-out split.", eval_command),
        "predict": Lazy("The most probable classes of video files, by a checkpoint.", predict_command),
        "features": Lazy("The encoder's pooled features of every video, as .npy files.", features_command),
        "compare": Lazy("The paper's Table II: methods x seeds, with verdicts on their differences.", compare_command),
        "demo": Lazy("The built-in synthetic set end to end: shards, SKD-SRL training, evaluation.", demo_command),
        "bench": Lazy("Throughput of the DALI loader against its peers, and of training steps.", bench_command),
        "preview": Lazy("Draw both augmented views of a few samples into a PNG.", preview_command),
        "plot": Lazy("Redraw a run's curves.png from its metrics.jsonl.", plot_command),
        "export": Lazy("A checkpoint as a folder to share: safetensors, config, model card, ONNX.", export_command),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        # a command's imports may need an extra that is not installed (DALI): one line, as when it runs
        command = user_errors(self.lazy[name].build)()
        command.short_help = self.lazy[name].summary
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with each lazy command's summary in place of building it."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [
            (name, self.lazy[name].summary if name in self.lazy else self.commands[name].get_short_help_str(limit))
            for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    envvar=LOG_LEVEL_ENV,
    show_default=True,
    show_envvar=True,
    help="the least important notices shown (retried reads, skipped samples and rebuilt pipelines are warnings)",
)
def main(log_level: str) -> None:
    """SKD-SRL: self-knowledge distillation with Siamese representation learning for video action recognition,
    on NVIDIA DALI."""
    configure_logging(log_level)


@main.group(invoke_without_command=True)
@config_options(PreprocessConfig)
@click.pass_context
@user_errors
def preprocess(ctx: click.Context, **options) -> None:
    """Transcode a video dataset into sharded WebDataset tars (see docs/format.md); merge, verify or bench them."""
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
    from preprocess.run import DiskCost
    from preprocess.shards import merge_parts

    manifest = merge_parts(Path(out))
    counts = ", ".join(f"{name} {split.samples} videos" for name, split in manifest.splits.items())
    click.echo(f"merged {out}/manifest.json: {counts}, {manifest.failures} failures")
    click.echo("\n".join(DiskCost(manifest.splits, taken={}, listed={}).lines()))


@preprocess.command("verify")
@click.argument("out")
@click.option("--workers", type=int, default=os.cpu_count(), show_default=True, help="shards checked at once")
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="the JSONL of damaged members (never written into OUT)  [default: ./damaged.jsonl]",
)
@user_errors
def preprocess_verify(out: str, workers: int, report: str | None) -> None:
    """Check every member of every shard of OUT (a folder, http(s) URL prefix or pipe: command, as --data takes):
    checksums, headers, metadata, labels. Prints the first damaged members and lists them all in a JSONL; exits 1 if
    there are any."""
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


if __name__ == "__main__":
    sys.exit(main())
