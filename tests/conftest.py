"""Shared fixtures. Each section belongs to the tests named in its heading."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import pkgutil
import shutil
import socket
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# --- The GPU machine (tests/test_gpu.py) -----------------------------------------------------------------------


def _staged_packages() -> None:
    """DALI, webdataset and ffmpeg-python unpacked into SITE there (../shared/gpu/README.md): found even when
    PYTHONPATH names only the source tree (`PYTHONPATH=. python3 -m pytest -m gpu tests/test_gpu.py`), as
    scripts/gpu_report.py finds them."""
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        return
    for site in (os.environ.get("SITE"), "/tmp/site"):
        if site and Path(site, "nvidia", "dali").is_dir():
            sys.path.insert(0, site)
            return


_staged_packages()

# --- Two ranks under torchrun (tests/test_train.py, tests/test_evaluate.py) ------------------------------------

TESTS = Path(__file__).resolve().parent


def run_two_ranks(script: Path, *args: str) -> None:
    """`script` as 2 gloo ranks under torchrun, on a port the OS has just said is free, with the repository and
    tests/ importable; fails with the ranks' stderr unless both exit cleanly. A script ends as the CLI's commands
    do, with `distributed.shutdown`: a gloo rank that exits without destroying its process group may abort
    ("terminate called without an active exception")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    done = subprocess.run([*command, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- Tiny real videos made with ffmpeg (tests/test_preprocess*.py) ---------------------------------------------


@functools.cache
def ffmpeg_binary() -> str:
    """`ffmpeg` on PATH, else imageio-ffmpeg's, looked up when a test first needs it: the GPU machine has neither,
    and its tests (test_gpu.py) must still be collected there."""
    if found := shutil.which("ffmpeg"):
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_test_video(
    path: Path,
    size: tuple[int, int] = (64, 48),
    seconds: float = 1.0,
    fps: int = 25,
    codec: str = "mpeg4",
    pattern: str = "testsrc2",
    extra: tuple[str, ...] = (),
    audio: bool = False,
) -> Path:
    """A `seconds` long `pattern` video (width, height) at `fps`; `extra` ffmpeg output options (filters,
    codec settings); `audio` adds a sine tone track."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = ["-f", "lavfi", "-i", f"{pattern}=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}"]
    if audio:
        inputs += ["-f", "lavfi", "-i", f"sine=duration={seconds}", "-c:a", "aac", "-shortest"]
    command = [
        ffmpeg_binary(),
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        *inputs,
        "-c:v",
        codec,
        *extra,
        "-y",
        str(path),
    ]
    subprocess.run(command, check=True)
    return path


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file for each kind of input the preprocess stage meets, made once per session. The usable ones are
    keyed by what they test; the unusable ones start with `bad_`."""
    d = tmp_path_factory.mktemp("sample_videos")
    x264 = ("-pix_fmt", "yuv420p")
    videos = {
        "landscape": make_test_video(d / "landscape.avi"),
        "other_pattern": make_test_video(d / "other_pattern.avi", pattern="smptebars"),
        "portrait": make_test_video(d / "portrait.mp4", size=(48, 64), codec="libx264", extra=x264),
        "odd_size": make_test_video(d / "odd_size.avi", size=(65, 49)),
        "anamorphic": make_test_video(d / "anamorphic.avi", extra=("-vf", "setsar=2")),  # displayed 128x48
        "audio": make_test_video(d / "audio.mp4", codec="libx264", extra=x264, audio=True),
        "short": make_test_video(d / "short.avi", seconds=0.4),  # 10 frames
        # every third frame slot left empty: about 18.75 frames a second at a declared 25
        "vfr": make_test_video(
            d / "vfr.mkv",
            seconds=2.0,
            codec="libx264",
            extra=("-vf", "setpts=(N+floor(N/3))/25/TB", "-fps_mode", "vfr"),
        ),
        "bad_audio_only": d / "bad_audio_only.mp4",
        "bad_zero_bytes": d / "bad_zero_bytes.avi",
        "bad_random_bytes": d / "bad_random_bytes.avi",
        "bad_text": d / "bad_text.mp4",
        "bad_truncated": d / "bad_truncated.avi",
        "bad_image": d / "bad_image.avi",
    }
    rotated = d / "rotated.mp4"  # landscape pixels, displayed rotated by 90 degrees: portrait
    landscape_mp4 = make_test_video(d / "landscape.mp4", codec="libx264", extra=x264)
    rotate = ["-display_rotation", "90", "-i", str(landscape_mp4), "-c", "copy", "-y", str(rotated)]
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", *rotate], check=True)
    videos["rotated"] = rotated
    tone = ["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", "-y", str(videos["bad_audio_only"])]
    subprocess.run([ffmpeg_binary(), "-nostdin", "-loglevel", "error", *tone], check=True)
    videos["bad_zero_bytes"].write_bytes(b"")
    videos["bad_random_bytes"].write_bytes(bytes(range(256)) * 40)
    videos["bad_text"].write_text("not a video, just some text\n")
    whole = make_test_video(d / "long.avi", seconds=2.0).read_bytes()
    videos["bad_truncated"].write_bytes(whole[: len(whole) // 3])
    make_test_video(d / "image.png", codec="png", extra=("-frames:v", "1")).rename(videos["bad_image"])
    return videos


# --- Another process holding an output folder's lock (tests/test_files.py, tests/test_preprocess.py) -----------------

HOLDER = """
import sys, time
from dali_skd.files import lock_directory
with lock_directory(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_elsewhere(directory: Path, name: str = ".lock") -> Iterator[subprocess.Popen]:
    """Another process holding `lock_directory(directory, name)` for the block; SIGKILLed at its end."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), name], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# --- Checkpoints made by hand (tests/test_train_faults.py, test_remote.py, test_untrusted.py, test_config.py) --------


def write_checkpoint(
    path: Path, config: Any, weights: dict | None = None, classes: tuple[str, ...] = ("a", "b")
) -> Path:
    """A checkpoint as `train` writes one for a run of `config` (a TrainConfig), its classifier `weights` (default:
    a fresh model's) under "model." of the method's state."""
    from dali_skd.checkpoint import save_checkpoint
    from dali_skd.config import to_dict
    from dali_skd.models import build_model

    weights = build_model(config.arch, len(classes)).state_dict() if weights is None else weights
    preprocessing = {
        "format": "jpeg",
        "short_side": 40,
        "fps": None,
        "frames_per_jpeg": 8,
        "quality": 90,
        "optimize_huffman": True,
    }
    state = {
        "method": {f"model.{k}": v for k, v in weights.items()},
        "config": to_dict(config),
        "classes": list(classes),
        "preprocessing": preprocessing,
    }
    save_checkpoint(path, state)
    return path


# --- Which config fields a command reads (the tests that run each command) ----------------------------------------


def _declaring(cls: type, name: str) -> type:
    """The dataclass along `cls`'s bases whose own annotations declare field `name`."""
    return next(k for k in cls.__mro__ if name in inspect.get_annotations(k))


@contextlib.contextmanager
def config_reads() -> Iterator[set[tuple[type, str]]]:
    """The config fields the code reads while the block runs, as (the dataclass declaring the field, its name). A
    read by the dataclass machinery (asdict, replace, the generated __eq__ and __repr__), the config module
    (copying, saving, comparing settings) or the CLI's wiring (building the config) is no use of a setting and is
    not counted."""
    import cli
    import dali_skd.commands
    from dali_skd import cli_options, config

    modules = [config] + [
        importlib.import_module(f"dali_skd.commands.{m.name}") for m in pkgutil.iter_modules(dali_skd.commands.__path__)
    ]
    classes = {v for m in modules for v in vars(m).values() if isinstance(v, type) and dataclasses.is_dataclass(v)}
    machinery = {"<string>", dataclasses.__file__, config.__file__, cli_options.__file__, cli.__file__}
    reads: set[tuple[type, str]] = set()

    def recording(cls: type) -> Any:
        declared = {f.name: _declaring(cls, f.name) for f in dataclasses.fields(cls)}

        def __getattribute__(self: Any, name: str) -> Any:
            if name in declared and sys._getframe(1).f_code.co_filename not in machinery:
                reads.add((declared[name], name))
            return object.__getattribute__(self, name)

        return __getattribute__

    for cls in classes:
        cls.__getattribute__ = recording(cls)
    try:
        yield reads
    finally:
        for cls in classes:
            del cls.__getattribute__


def unread(cls: type, reads: set[tuple[type, str]]) -> list[str]:
    """The flags of `cls` (a command's config) whose field no code read (`config_reads`)."""
    from dali_skd.cli_options import flag, leaves

    missing = []
    for path, f, _ in leaves(cls):
        part = cls
        for name in path[:-1]:
            part = typing.get_type_hints(part)[name]
        if (_declaring(part, f.name), f.name) not in reads:
            missing.append(flag(path))
    return missing
