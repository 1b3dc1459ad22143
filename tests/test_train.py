"""The trainer and evaluator on the CPU: real loader, tiny model, tiny clips."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import config_reads, run_two_ranks, unread

from dali_skd.config import ClipConfig, LoaderConfig, OptimConfig, SamplingConfig, TrainConfig, to_dict
from dali_skd.data.holdout import group_of, held_out, training_holdout
from dali_skd.data.shards import VideoRecord, load_manifest, shard_records, split_urls
from dali_skd.data.source import RECORDS
from dali_skd.distributed import init_distributed
from dali_skd.training import Trainer, TrainSummary, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two classes of 12-frame noise videos told apart by their tint, 8 for training and 4 for testing."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(12)]
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=2)


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{
            "arch": "r3d10-tiny", "data": str(data), "out": str(out), "epochs": 2, "batch_size": 4, "device": "cpu",
            "clip": ClipConfig(length=8, crop=32), "sampling": SamplingConfig(shuffle_buffer=2),
            "loader": LoaderConfig(threads=2), **kw,
        }
    )  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_lowers_the_loss(data: Path, tmp_path: Path) -> None:
    cfg = tiny(data, tmp_path / "run", method="baseline", epochs=6)
    trainer = Trainer.from_config(cfg, init_distributed("cpu"))
    summary = trainer.run()
    assert trainer.train_loader.pipeline_builds == trainer.val_loader.pipeline_builds == 1  # one each for 6 epochs
    rows = metrics(tmp_path / "run")
    assert len(rows) == 6
    assert rows[-1]["loss"] + rows[-2]["loss"] < 0.7 * (rows[0]["loss"] + rows[1]["loss"]), [r["loss"] for r in rows]
    val = [r["val_top1"] for r in rows]
    assert summary.best_top1 == max(val) and summary.best_epoch == val.index(max(val)) + 1  # the first best epoch
    assert [r["best_top1"] for r in rows] == [max(val[: i + 1]) for i in range(6)]
    assert {"loss", "loss_ce", "lr", "train_top1", "val_top1", "samples_per_s", "data_wait"} <= set(rows[0])
    for name in ("best.pt", "last.pt", "config.json", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    assert list((tmp_path / "run" / "tb").iterdir())


@pytest.mark.slow
def test_skd_srl_logs_every_loss_term(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", epochs=1))
    assert {"loss_ce", "loss_kl", "loss_sim"} <= set(metrics(tmp_path / "run")[0])


@pytest.mark.slow
@pytest.mark.parametrize("val_fraction", [0.0, 0.25])  # validated on test (the paper), or on held-out training videos
def test_resume_gives_the_same_weights_after_moving_the_shards_and_the_run(
    data: Path, tmp_path: Path, val_fraction: float
) -> None:
    train(tiny(data, tmp_path / "straight", val_fraction=val_fraction))
    shutil.copytree(data, tmp_path / "shards")
    train(tiny(tmp_path / "shards", tmp_path / "resumed", epochs=1, val_fraction=val_fraction))
    # both folders moved to another disk; the loader set up otherwise: none of it changes the result
    (tmp_path / "shards").rename(tmp_path / "moved-shards")
    (tmp_path / "resumed").rename(tmp_path / "moved-run")
    cfg = tiny(tmp_path / "moved-shards", tmp_path / "moved-run", resume=True, log_every=1, val_fraction=val_fraction)
    cfg.loader.threads, cfg.loader.prefetch = 1, 3
    train(cfg)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "moved-run" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    assert [r["epoch"] for r in metrics(tmp_path / "moved-run")] == [1, 2]


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_dirs(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", epochs=2))
    with pytest.raises(FileExistsError, match="add --resume"):
        train(tiny(data, tmp_path / "run", epochs=2))
    cfg = tiny(data, tmp_path / "run", epochs=3, optim=OptimConfig(lr=0.5), resume=True, val_fraction=0.25)
    cfg.clip.crop = 48
    with pytest.raises(
        ValueError,
        match=r"other settings \(clip.crop: 32 then, 48 now; optim.lr: 0.01 then, 0.5 now; val_fraction: 0.0 then, "
        r"0.25 now\)",
    ):
        train(cfg)
    with pytest.raises(ValueError, match="has trained 2 epochs, more than --epochs 1: resume with --epochs 2 or more"):
        train(tiny(data, tmp_path / "run", epochs=1, resume=True))


def test_a_validation_part_is_a_hash_chosen_fraction_of_each_class() -> None:
    ranges = [(0, 10), (10, 12), (12, 13)]  # classes of 10, 2 and 1 videos
    keys = {c: [f"train-{i:07d}" for i in range(first, last)] for c, (first, last) in enumerate(ranges)}
    held = held_out(keys, 0.2)
    chosen = [sorted(k for k in held if k in keys[c]) for c in (0, 1, 2)]
    assert [len(c) for c in chosen] == [2, 1, 0]  # rounded; at least one of a class of two; never a class's last
    assert held_out({c: list(reversed(k)) for c, k in keys.items()}, 0.2) == held  # by the keys, not their order
    assert held_out(keys, 0.3) > held  # a larger fraction holds more of the same order
    with pytest.raises(ValueError, match="--val-fraction is 1"):
        training_holdout("unused", None, 1, None, 60)


def test_a_summary_says_when_no_epoch_was_trained_by_its_process(tmp_path: Path) -> None:
    trained = TrainSummary(tmp_path, 30, 0.5, 20, {"samples_per_s": 41.26, "data_wait": 0.03}, 60.0)
    assert "best validation top-1 50.00% (video-level) at epoch 20 of 30" in trained.format()
    assert "last epoch 41.3 samples/s, data wait 3%" in trained.format()
    resumed_at_the_end = TrainSummary(tmp_path, 30, 0.5, 20, {}, 0.1)  # no "last epoch 0.0 samples/s"
    assert "no epoch trained here: the run had trained them all before it was resumed" in resumed_at_the_end.format()


def test_clips_cut_together_are_held_out_together() -> None:
    assert group_of("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi") == "v_ApplyEyeMakeup_g08"  # UCF101
    assert group_of("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_2.avi") == "April_09_brush_hair"  # HMDB51
    for ungrouped in ("train/circle/circle_0004.mp4", "abseiling/0347ZoDXyP0_000095_000105.mp4", "a/v_x_g08_c01"):
        assert group_of(ungrouped) is None  # the synthetic set, Kinetics, a name without an extension
    keys = {0: [f"k{i}" for i in range(12)]}
    groups = {f"k{i}": f"g{i // 4}" for i in range(8)}  # two groups of four, and four videos of no group
    for fraction in (0.1, 0.3, 0.5):
        held = held_out(keys, fraction, groups)
        units = [{k for k in keys[0] if groups.get(k, k) == g} for g in {groups.get(k, k) for k in held}]
        assert held == set().union(*units) and len(units) == min(5, max(1, round(fraction * 6)))  # 6 units, whole
    assert held_out(keys, 0.99, groups) != set(keys[0])  # never a class's last group


def test_a_grouped_dataset_holds_out_whole_groups(tmp_path: Path) -> None:
    names = [f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi" for c in ("A", "B") for g in range(1, 5) for k in range(1, 4)]
    videos = [(noise_frames(4, seed=i, tint=i // 12), i // 12) for i in range(24)]
    data = write_dataset(
        tmp_path, {"train": videos, "test": videos[:2]}, ["A", "B"], per_shard=8, sources={"train": names}
    )
    holdout = training_holdout(str(data), load_manifest(str(data)), 0.25, None, 60)
    sources = {r.key: r.meta.source for url in split_urls(str(data), load_manifest(str(data)), "train")
               for r in shard_records(url, "jpgs")}  # fmt: skip
    held_groups = {group_of(sources[k]) for k in holdout.keys}
    assert len(holdout.keys) == 6 and len(held_groups) == 2  # one group of three clips of each class's four
    assert {k for k, s in sources.items() if group_of(s) in held_groups} == holdout.keys
    assert holdout.grouped == 24 and "0.25 of each class's groups of clips" in holdout.protocol()
    one_group = [f"{c}/v_{c}_g01_c{k:02d}.avi" for c in ("A", "B") for k in range(1, 13)]  # nothing to hold apart
    data = write_dataset(
        tmp_path / "one", {"train": videos, "test": videos[:2]}, ["A", "B"], sources={"train": one_group}
    )
    with pytest.raises(ValueError, match=r"one: no class .*two groups of clips.* pass --val-fraction 0"):
        training_holdout(str(data), load_manifest(str(data)), 0.25, None, 60)


@pytest.mark.slow
def test_validation_apart_from_test_never_trains_on_its_videos(data: Path, tmp_path: Path) -> None:
    manifest = load_manifest(str(data))
    holdout = training_holdout(str(data), manifest, 0.25, None, 60)
    labels = {
        r.key: r.meta.label
        for url in split_urls(str(data), manifest, "train")
        for r in shard_records(url, "jpgs")
        if isinstance(r, VideoRecord)
    }
    assert len(labels) == 8 and sorted(labels[k] for k in holdout.keys) == [0, 1]  # one of each class's four
    trainer = Trainer.from_config(tiny(data, tmp_path / "run", val_fraction=0.25, epochs=1), init_distributed("cpu"))
    loader = trainer.train_loader
    assert loader.epoch_samples == 6 and loader.steps_per_epoch == 1
    endless = loader.host_batches(0, None)  # pass after pass over the epoch's videos
    trained = {r.key for batch in itertools.islice(endless, 12) for r in batch[RECORDS]}
    assert trained == labels.keys() - holdout.keys
    assert {r.key for r in trainer.val_loader.reader.records()} == holdout.keys
    summary = trainer.run()
    assert metrics(tmp_path / "run")[0]["val_videos"] == 2
    assert "validation on 0.25 of each class of the training split, held out" in summary.format()


RANK_SCRIPT = """
import sys, torch
from dali_skd.config import TrainConfig, from_dict
from dali_skd.distributed import init_distributed, shutdown
from dali_skd.training import Trainer
import itertools
import json
cfg = from_dict(TrainConfig, json.loads(sys.argv[1]))
ctx = init_distributed("cpu")
trainer = Trainer.from_config(cfg, ctx)
trainer.run()
torch.save(trainer.method.state_dict(), f"{cfg.out}/rank{ctx.rank}.pt")
shutdown(ctx)
"""


@pytest.mark.slow
def test_two_processes_with_gloo_stay_in_sync(data: Path, tmp_path: Path) -> None:
    cfg = tiny(data, tmp_path / "ddp", batch_size=2)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_two_ranks(script, json.dumps(to_dict(cfg)))
    w0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    for key, value in w0.items():
        assert torch.equal(value, w1[key]), key
    rows = metrics(tmp_path / "ddp")
    assert [r["val_videos"] for r in rows] == [4, 4]  # each test video once over both ranks
    assert all(r["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_eval_counts_every_video_and_clip(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", epochs=1))
    out = tmp_path / "eval.json"
    result = invoke(
        "eval", "--data", str(data), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--clips-per-video", "3",
        "--clip.length", "8", "--clip.crop", "32", "--device", "cpu", "--json", str(out),
    )  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["videos"] == 4 and figures["clips"] == 12
    assert "video-level top-1" in result.output


def test_cli_errors_are_plain_messages(data: Path, tmp_path: Path) -> None:
    result = invoke("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), expect_error=True)
    assert "no manifest.json in" in result.output and "Traceback" not in result.output

    old = tmp_path / "old"
    old.mkdir()
    raw = json.loads((data / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**raw, "format_version": 0}))
    result = invoke("train", "--data", str(old), "--out", str(tmp_path / "r"), expect_error=True)
    assert "format version 0" in result.output and "re-run `python cli.py preprocess`" in result.output

    result = invoke(
        "train",
        "--data",
        str(data),
        "--method",
        "kd",
        "--arch",
        "r3d10-tiny",
        "--out",
        str(tmp_path / "r"),
        expect_error=True,
    )
    assert "needs a teacher" in result.output


@pytest.mark.slow
def test_teacher_with_other_classes_is_refused(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "teacher", epochs=1))
    other = write_dataset(
        tmp_path / "three", {"train": [(noise_frames(12, seed=i), i) for i in range(3)]}, ["a", "b", "c"]
    )
    cfg = tiny(data, tmp_path / "student", method="kd", teacher=str(tmp_path / "teacher" / "best.pt"))
    cfg.data = str(other)
    with pytest.raises(ValueError, match="trained on 2 classes, this dataset has 3"):
        train(cfg)


def test_more_gpus_than_present_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"has 1 GPU.*--nproc-per-node 1"):
        init_distributed("cuda")


def test_plot_command_redraws_the_curves(data: Path, tmp_path: Path) -> None:
    train(tiny(data, tmp_path / "run", epochs=1))
    (tmp_path / "run" / "curves.png").unlink()
    invoke("plot", str(tmp_path / "run"))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_train_reads_every_flag_it_offers(data: Path, tmp_path: Path) -> None:
    """Every field of TrainConfig is read by a run of `cli.py train`: skd-srl's, then kd's, whose loss reads the
    terms skd-srl's does not."""
    tiny_flags = ["--data", str(data), "--arch", "r3d10-tiny", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                  "--clip.length", "8", "--clip.crop", "32", "--sampling.shuffle-buffer", "2"]  # fmt: skip
    with config_reads() as reads:
        invoke("train", *tiny_flags, "--out", str(tmp_path / "skd"))
        teacher = str(tmp_path / "skd" / "best.pt")
        invoke("train", *tiny_flags, "--out", str(tmp_path / "kd"), "--method", "kd", "--teacher", teacher)
    assert unread(TrainConfig, reads) == []


def test_the_epoch_line_counts_what_went_wrong_in_words() -> None:
    from dali_skd.training import _epoch_line

    record = {"epoch": 2, "loss": 1.5, "train_top1": 0.5, "samples_per_s": 10.0, "data_wait": 0.1, "epoch_seconds": 9,
              "val_top1": 0.25, "val_top5": 0.75, "val_videos": 48, "best_top1": 0.3}  # fmt: skip
    assert _epoch_line(record, 5, 2).endswith("(48 videos), best so far")
    record.update(skipped=1, scaler_skipped_steps=3, val_nonfinite_clips=0)
    line = _epoch_line(record, 5, 1)
    assert line.endswith(
        "best 30.00% (epoch 1); 1 damaged or unreadable training sample skipped; 3 fp16 steps skipped"
    ), line
