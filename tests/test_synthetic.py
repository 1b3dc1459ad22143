"""The synthetic dataset: deterministic, single frames alike across classes, motion telling them apart, and a
generator that writes the promised tree with the real ffmpeg, resumes, and refuses a folder made otherwise."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
from conftest import ffmpeg_binary

from preprocess.synthetic import (
    DIFFICULTIES,
    HARD_MOTIONS,
    HEIGHT,
    SYNTHETIC_CLASSES,
    WIDTH,
    _videos,
    generate_synthetic,
    render_video,
)

TINY = {"classes": 3, "videos_per_class": 5, "seed": 0, "fps": 10, "seconds": 0.6}  # 6 frames a video


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), workers=2, progress=False, **TINY)


def _decode(path: Path) -> np.ndarray:
    raw, _ = (
        ffmpeg.input(str(path))
        .output("pipe:", format="rawvideo", pix_fmt="rgb24")
        .run(cmd=ffmpeg_binary(), capture_stdout=True, capture_stderr=True)
    )
    return np.frombuffer(raw, np.uint8).reshape(-1, HEIGHT, WIDTH, 3)


def test_render_is_deterministic_by_seed() -> None:
    video = render_video(0, 7, frames=6, width=112, height=84)
    assert video.shape == (6, 84, 112, 3)
    assert video.dtype == np.uint8
    assert np.array_equal(video, render_video(0, 7, frames=6, width=112, height=84))
    assert not np.array_equal(video, render_video(0, 8, frames=6, width=112, height=84))


def test_every_class_renders_at_the_default_size() -> None:
    for label in range(len(SYNTHETIC_CLASSES)):
        video = render_video(label, label, frames=3)
        assert video.shape == (3, HEIGHT, WIDTH, 3)
        assert 60 < video.mean() < 190, f"{SYNTHETIC_CLASSES[label]}: mean intensity {video.mean():.0f}"


def test_time_mirrored_classes_are_the_same_videos_backwards() -> None:
    for forward, backward in (("up_slow", "down_slow"), ("expand", "contract")):
        video = render_video(SYNTHETIC_CLASSES.index(forward), 3, frames=5, width=112, height=84)
        mirrored = render_video(SYNTHETIC_CLASSES.index(backward), 3, frames=5, width=112, height=84)
        assert np.array_equal(mirrored, video[::-1])


def _frame_statistics(video: np.ndarray) -> np.ndarray:
    """Per frame: mean intensity, its spread, and the share of object-like (very dark or very bright) pixels."""
    grey = video.mean(axis=-1)
    return np.stack([grey.mean((1, 2)), grey.std((1, 2)), ((grey < 75) | (grey > 180)).mean((1, 2))], axis=1)


def test_single_frames_look_alike_in_every_class() -> None:
    """No single-frame statistic separates the classes: between-class differences stay within the
    spread of each class."""
    per_class = np.stack(
        [
            np.concatenate(
                [_frame_statistics(render_video(label, 100 * label + seed, 1, 25, 112, 84)) for seed in range(12)]
            )
            for label in range(len(SYNTHETIC_CLASSES))
        ]
    )  # (classes, frames, statistics)
    spread_between = per_class.mean(axis=1).std(axis=0)
    spread_within = per_class.std(axis=1).mean(axis=0)
    assert np.all(spread_between < 0.5 * spread_within), (spread_between, spread_within)


def test_single_frames_look_alike_in_every_hard_class() -> None:
    """As in the normal set: decoys, shake and each video's own scene change no single frame's statistics
    by class."""
    per_class = np.stack(
        [
            np.concatenate(
                [
                    _frame_statistics(render_video(label, 100 * label + seed, 1, 25, 112, 84, difficulty="hard"))
                    for seed in range(12)
                ]
            )
            for label in range(len(HARD_MOTIONS))
        ]
    )  # (classes, frames, statistics)
    spread_between = per_class.mean(axis=1).std(axis=0)
    spread_within = per_class.std(axis=1).mean(axis=0)
    assert np.all(spread_between < 0.5 * spread_within), (spread_between, spread_within)


def _vertical_motion(video: np.ndarray, reach: int = 10) -> float:
    """The vertical shift (px per frame, + down) that best re-finds the horizontal edges of each frame (only
    objects have sharp ones) in the next; the median over successive frames."""
    grey = video.mean(axis=-1)
    height = grey.shape[1]
    shifts = []
    for before, after in itertools.pairwise(grey):
        core = before[reach : height - reach]
        edges = np.abs(before[reach + 1 : height - reach + 1] - before[reach - 1 : height - reach - 1]) > 80
        errors = [np.abs(after[reach + s : height - reach + s] - core)[edges].mean() for s in range(-reach, reach + 1)]
        shifts.append(int(np.argmin(errors)) - reach)
    return float(np.median(shifts))


def test_motion_tells_up_from_down_and_slow_from_fast() -> None:
    """At 25 fps: slow is 2.4 to 3.6 px per frame, fast 6 to 8."""
    motion = {
        name: [_vertical_motion(render_video(SYNTHETIC_CLASSES.index(name), seed, frames=8)) for seed in range(3)]
        for name in ("up_slow", "down_slow", "up_fast", "down_fast", "horizontal")
    }
    assert all(-4 <= m <= -2 for m in motion["up_slow"]), motion
    assert all(2 <= m <= 4 for m in motion["down_slow"]), motion
    assert all(m <= -5 for m in motion["up_fast"]), motion
    assert all(m >= 5 for m in motion["down_fast"]), motion
    assert all(abs(m) <= 1 for m in motion["horizontal"]), motion


def test_tree_classes_and_split(tiny_root: Path) -> None:
    names = SYNTHETIC_CLASSES[: TINY["classes"]]
    assert (tiny_root / "classes.txt").read_text().splitlines() == names
    saved = json.loads((tiny_root / "synthetic.json").read_text())
    assert {key: saved[key] for key in TINY} == TINY
    assert "version" in saved
    for name in names:
        assert sorted(p.name for p in (tiny_root / "train" / name).iterdir()) == [
            f"{name}_{i:04d}.mp4" for i in range(4)
        ]
        assert sorted(p.name for p in (tiny_root / "test" / name).iterdir()) == [f"{name}_0004.mp4"]
    assert sorted(p.name for p in tiny_root.iterdir()) == ["classes.txt", "synthetic.json", "test", "train"]


def test_videos_decode_to_the_rendered_frames(tiny_root: Path) -> None:
    video = _videos(tiny_root, **TINY)[-1]
    decoded = _decode(video.path)
    rendered = render_video(video.class_index, video.seed, video.frames, video.fps)
    assert decoded.shape == rendered.shape == (6, HEIGHT, WIDTH, 3)
    assert np.abs(decoded.astype(int) - rendered).mean() < 6


def test_rerun_returns_at_once_and_resumes_with_identical_bytes(tiny_root: Path) -> None:
    videos = sorted(tiny_root.rglob("*.mp4"))
    stamps = [p.stat().st_mtime_ns for p in videos]
    assert generate_synthetic(tiny_root, workers=2, progress=False, **TINY) == tiny_root
    assert [p.stat().st_mtime_ns for p in videos] == stamps

    lost = videos[3]
    original = lost.read_bytes()
    lost.unlink()
    lost.with_name(f".{lost.name}.partial").write_bytes(b"interrupted")
    generate_synthetic(tiny_root, workers=1, progress=False, **TINY)
    assert lost.read_bytes() == original
    assert not list(tiny_root.rglob("*.partial"))


def test_refuses_a_folder_made_otherwise(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        FileExistsError, match=rf"{re.escape(str(tiny_root))}.*seed 0 \(asked 1\).*delete it or pick another"
    ):
        generate_synthetic(tiny_root, progress=False, **{**TINY, "seed": 1})
    (tmp_path / "mine.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match=r"no synthetic\.json"):
        generate_synthetic(tmp_path, progress=False, **TINY)


def test_rejects_class_counts_it_cannot_make(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"13 classes asked for, but there are 2 to {len(SYNTHETIC_CLASSES)}"):
        generate_synthetic(tmp_path / "a", classes=13, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        generate_synthetic(tmp_path / "b", videos_per_class=1, progress=False)
    assert not os.listdir(tmp_path)


def test_hard_set_tree_split_and_defaults(tmp_path: Path) -> None:
    """The hard set writes its own classes and holds out its own share of each class; its folder refuses the
    normal set, and the defaults it did not get name what they would have been."""
    hard = DIFFICULTIES["hard"]
    tiny = {**TINY, "videos_per_class": 2 * hard.test_every, "difficulty": "hard"}
    root = generate_synthetic(tmp_path / "hard", workers=2, progress=False, **tiny)
    names = [motion.name for motion in HARD_MOTIONS[: TINY["classes"]]]
    assert (root / "classes.txt").read_text().splitlines() == names
    assert json.loads((root / "synthetic.json").read_text())["difficulty"] == "hard"
    for name in names:
        assert len(list((root / "test" / name).iterdir())) == 2
        assert len(list((root / "train" / name).iterdir())) == 2 * hard.test_every - 2
    with pytest.raises(FileExistsError, match=r"difficulty 'hard' \(asked 'normal'\)"):
        generate_synthetic(root, progress=False, **{**tiny, "difficulty": "normal"})
    with pytest.raises(
        FileExistsError, match=rf"classes 3 \(asked {hard.classes}\).*per_class \d+ \(asked {hard.videos_per_class}\)"
    ):
        generate_synthetic(root, progress=False, fps=10, seconds=0.6, difficulty="hard")
    with pytest.raises(ValueError, match=f"13 classes asked for, but there are 2 to {len(HARD_MOTIONS)} in the hard"):
        generate_synthetic(tmp_path / "none", classes=13, progress=False, difficulty="hard")
