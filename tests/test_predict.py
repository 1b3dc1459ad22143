"""eval's full report, predict and features after a tiny training run, and predict on its exported folder: real videos
(ffmpeg), preprocess, training, the CLI as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clickit import invoke
from conftest import config_reads, make_test_video, unread

from dali_skd.commands.eval import EvalConfig
from dali_skd.commands.features import FeaturesConfig
from dali_skd.commands.predict import PredictConfig
from dali_skd.config import ClipConfig, LoaderConfig, PreprocessConfig, SamplingConfig, TrainConfig
from dali_skd.training import train
from preprocess.run import run_preprocess
from preprocess.transcode import DEFAULT_QUALITY

PATTERNS = ("testsrc2", "smptebars", "rgbtestsrc")  # a class each
SIZES = ((64, 48), (80, 48), (72, 56))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Six videos of each of three test patterns (4 training, 2 test; sizes, lengths and hues vary), preprocessed at
    short side 40; a tiny model trained on clips of 8 frames taken every 2nd frame, cropped to 32 pixels."""
    root = tmp_path_factory.mktemp("predict")
    for pattern in PATTERNS:
        for i in range(6):
            hue = ("-vf", f"hue=h={40 * i}")
            path = root / "videos" / pattern / f"{pattern}_{i}.avi"
            make_test_video(path, SIZES[i % 3], seconds=0.8 + 0.1 * (i % 3), pattern=pattern, extra=hue)
    data = root / "data"
    prep = PreprocessConfig(
        dataset="folder", root=str(root / "videos"), out=str(data), short_side=40, val_fraction=0.34, workers=2
    )
    run_preprocess(prep, progress=False)
    run = root / "run"
    train(
        TrainConfig(
            method="baseline", arch="r3d10-tiny", data=str(data), out=str(run), epochs=2, batch_size=4, device="cpu",
            clip=ClipConfig(length=8, frame_stride=2, crop=32), sampling=SamplingConfig(shuffle_buffer=2),
            loader=LoaderConfig(threads=2),
        )
    )  # fmt: skip
    return {"videos": root / "videos", "data": data, "checkpoint": run / "best.pt", "root": root}


@pytest.fixture(scope="module")
def evaluated(trained: dict[str, Path]) -> tuple[Path, set]:
    """eval, three crops a clip; the clips cut as the model was trained (8 frames, every 2nd, 32 pixels: eval takes
    them from the checkpoint); and the config fields it read."""
    out = trained["root"] / "eval.json"
    with config_reads() as reads:
        result = invoke(
            "eval", "--data", str(trained["data"]), "--checkpoint", str(trained["checkpoint"]), "--clips-per-video",
            "2", "--spatial-crops", "3", "--device", "cpu", "--json", str(out),
        )  # fmt: skip
    assert "mean-class top-1" in result.output and "worst classes" in result.output
    return out, reads


def test_eval_reports_per_class_accuracy_and_the_confusion_matrix(evaluated: tuple[Path, set]) -> None:
    assert unread(EvalConfig, evaluated[1]) == []  # eval offers no flag that does nothing
    figures = json.loads(evaluated[0].read_text())
    confusion = np.array(figures["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == figures["videos"] == 6
    assert np.trace(confusion) / confusion.sum() == pytest.approx(figures["video_top1"])
    assert figures["clips"] == 6 * 2 * 3 and figures["spatial_crops"] == 3
    per_class = figures["per_class"]
    assert [c["class"] for c in per_class] == figures["classes"] == sorted(PATTERNS)
    assert [c["videos"] for c in per_class] == confusion.sum(axis=1).tolist() == [2, 2, 2]
    assert [c["top1"] for c in per_class] == pytest.approx((np.diag(confusion) / 2).tolist())
    assert figures["mean_class_top1"] == pytest.approx(np.mean(np.diag(confusion) / 2))
    rows = [json.loads(line) for line in Path(figures["predictions"]).read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"test-{i:07d}" for i in range(6)]
    for row in rows:
        assert row["source"].split("/")[0] == row["label_name"] == figures["classes"][row["label"]]
        assert len(row["top"]) == 3 and sum(c["probability"] for c in row["top"]) == pytest.approx(1, abs=1e-5)
        assert row["top"][0]["probability"] >= row["top"][1]["probability"] >= row["top"][2]["probability"]
    predicted = [figures["classes"].index(r["top"][0]["class"]) for r in rows]
    assert np.trace(confusion) == sum(p == r["label"] for p, r in zip(predicted, rows, strict=True))
    assert Path(figures["confusion_png"]).stat().st_size > 5000


def test_predict_agrees_with_eval_and_reports_a_bad_file(
    trained: dict[str, Path], evaluated: tuple[Path, set], tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in evaluated[0].with_suffix(".predictions.jsonl").read_text().splitlines()]
    videos = [str(trained["videos"] / row["source"]) for row in rows]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "predict.json"
    with config_reads() as reads:
        result = invoke(
            "predict", videos[0], str(bad), *videos[1:], "--checkpoint", str(trained["checkpoint"]), "--spatial-crops",
            "3", "--clips-per-video", "2", "--device", "cpu", "--json", str(out), expect_error=True,
        )  # fmt: skip
    assert unread(PredictConfig, reads) == []
    assert f"{bad}: ffmpeg:" in result.stderr and "1 of 7 videos could not be predicted" in result.stderr
    predicted = json.loads(out.read_text())["videos"]
    assert predicted[1] == {"video": str(bad), "error": predicted[1]["error"]} and predicted[1]["error"]
    del predicted[1]
    assert [p["video"] for p in predicted] == videos
    for row, prediction in zip(rows, predicted, strict=True):
        assert [c["class"] for c in prediction["top"]] == [c["class"] for c in row["top"]]
        np.testing.assert_allclose(
            [c["probability"] for c in prediction["top"]], [c["probability"] for c in row["top"]], atol=1e-4
        )
        assert f"{prediction['video']}: {row['top'][0]['class']} " in result.stdout


def test_predict_transcodes_as_the_training_data_was_unless_told(trained: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(trained["checkpoint"], weights_only=True)
    defaults = PreprocessConfig()
    assert state["preprocessing"] == {
        "format": "jpeg",
        "short_side": 40,
        "fps": None,
        "frames_per_jpeg": defaults.frames_per_jpeg,
        "quality": DEFAULT_QUALITY["jpeg"],
        "optimize_huffman": defaults.optimize_huffman,
    }
    video = str(next(trained["videos"].glob("smptebars/*.avi")))
    args = ("--device", "cpu", "--top-k", "2")
    given = invoke("predict", video, "--checkpoint", str(trained["checkpoint"]), "--short-side", "40", *args).stdout
    assert given == invoke("predict", video, "--checkpoint", str(trained["checkpoint"]), *args).stdout
    assert given.startswith(f"{video}: ") and given.count("%") == 2
    del state["preprocessing"]
    torch.save(state, tmp_path / "stripped.pt")
    result = invoke("predict", video, "--checkpoint", str(tmp_path / "stripped.pt"), *args, expect_error=True)
    assert f"{tmp_path / 'stripped.pt'}: it does not record how its training videos were preprocessed" in result.output


def test_an_exported_folder_predicts_as_its_checkpoint(trained: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    invoke("export", "--checkpoint", str(trained["checkpoint"]), "--out", str(folder))
    videos = sorted(map(str, trained["videos"].glob("*/*_[05].avi")))  # one of each size, of each class
    args = ("--device", "cpu", "--clips-per-video", "2", "--spatial-crops", "3", "--top-k", "3")
    predictions = []
    for model in (trained["checkpoint"], folder):
        out = tmp_path / f"{model.name}.json"
        invoke("predict", *videos, "--checkpoint", str(model), *args, "--json", str(out))
        predictions.append(json.loads(out.read_text())["videos"])
    assert len(predictions[0]) == 6 and predictions[0] == predictions[1]  # the same classes and probabilities


def test_features_match_their_rows_and_a_linear_probe_beats_chance(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "features"
    with config_reads() as reads:
        invoke("features", "--data", str(trained["data"]), "--checkpoint", str(trained["checkpoint"]),
               "--out", str(out), "--device", "cpu")  # fmt: skip
    assert unread(FeaturesConfig, reads) == []
    manifest = json.loads((trained["data"] / "manifest.json").read_text())
    split = {}
    for name in ("train", "test"):
        x = np.load(out / f"{name}.npy")
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert x.dtype == np.float16 and x.shape[0] == len(rows) == manifest["splits"][name]["samples"]
        assert [r["key"] for r in rows] == [f"{name}-{i:07d}" for i in range(len(rows))]
        assert all(manifest["classes"][r["label"]] == r["source"].split("/")[0] for r in rows)
        split[name] = (x.astype(np.float64), np.array([r["label"] for r in rows]))
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    assert x_train.shape == (12, x_test.shape[1]) and np.isfinite(x_train).all() and x_train.std(axis=0).max() > 0
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    design = np.hstack([(x_train - mean) / std, np.ones((12, 1))])
    ridge = np.vstack([design, 1.0 * np.eye(design.shape[1])])  # least squares onto one-hot labels, ridge 1
    targets = np.vstack([np.eye(3)[y_train], np.zeros((design.shape[1], 3))])
    weights = np.linalg.lstsq(ridge, targets, rcond=None)[0]
    scores = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))]) @ weights
    accuracy = (scores.argmax(axis=1) == y_test).mean()
    assert accuracy >= 5 / 6, accuracy  # chance: 1/3
