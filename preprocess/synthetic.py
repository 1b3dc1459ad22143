"""The built-in synthetic dataset: videos whose class is a motion, so that no single frame can tell it.

Every video shows about twenty objects (discs, squares, rings, diamonds, crosses; dark or bright, any tint)
over a drifting, noisy texture. The class sets how the "targets" move; the "distractors" (a fifth of the
objects) drift in random directions in every class. Each object lives one second, then reappears
elsewhere. Objects are spawned uniformly over a region holding every point they can reach, so at any
instant they cover the frame uniformly: a frame has the same statistics in every class, and time-mirrored
classes (up and down, expand and contract) are the same videos played backwards.

The classes survive the training augmentations: none tells left from right (horizontal flip), none
depends on colour, brightness or contrast, every object is larger than a blur, the motion fills the frame
(random crop) and lasts the whole video (random clip).

The hard set (`--difficulty hard`, DIFFICULTIES) is for comparing training methods: on the normal one the plain
cross-entropy baseline already reaches 99%. It is made so that a 3D CNN trained from scratch falls well short of
what the motions allow and overfits, as on UCF101:

- twelve classes that differ by subtler motion: up and down, each slow (35-50 px/s) or fast (75-100); sideways,
  slow or fast; expand and contract; rotation, slow or fast (either way round); bob at 1 or 2 Hz with the same
  peak speed. Every class survives the augmentations as the normal ones do.
- clutter that moves: decoys (4 on screen to the targets' 14) move like the targets of another class (drawn per
  video from all twelve); each target and decoy keeps its own pace (the video's rate +-15%); the camera shakes
  (up to 2 px on each axis, at 1-4 Hz); the background drifts up to 60 px/s, faster than the slow targets.
- few training videos, in groups: by default all 12 classes, 24 videos each (`--classes`, `--videos-per-class`
  change that), the last third held out: 16 train and 8 test; each run of three videos of a split shares one
  background, as a group of UCF101 clips shares a setting. Three training videos with one background and one
  label are a shortcut a network learns before the motion, and it is no help on the test videos' backgrounds
  (groups of two overfit less, of four more: docs/benchmarks.md).

A frame still has the same statistics in every class. What only the hard set draws comes from a second random
stream, so the normal set renders as before, byte for byte. Measured 2026-11-26 on the 2-core AMD EPYC machine,
pinned to one core (docs/benchmarks.md, "Hard synthetic set"): the plain baseline (r3d10-tiny from scratch, 30
epochs, about 3 minutes) gets 39.6% and 38.5% video-level test top-1 (seeds 0 and 1) against 63.0% and 58.9% on
its own training videos; a single-frame 2D CNN gets 14.6% (chance 8.3%) while fitting 73.5% of its training frames.

Output tree, read by the `synthetic` dataset adapter:

    ROOT/classes.txt                               class names, one a line, in label order
    ROOT/synthetic.json                            the parameters (written first: a rerun resumes or refuses)
    ROOT/{train,test}/<class>/<class>_<index>.mp4  one in five videos of each class is a test video (hard: three)
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ffmpeg
import numpy as np

from dali_skd.errors import ConfigError, OutputExists, RunFailed
from dali_skd.files import write_atomic
from dali_skd.progress import Progress

SYNTHETIC_VERSION = 1  # bump whenever the same parameters would render other videos
WIDTH, HEIGHT = 224, 168  # 4:3, not the training size: the transcode rescales it like a real dataset
CRF = 20
PRESET = "superfast"  # a fifth of medium's time; files about 1.5 times larger

Flow = Literal["still", "rise", "pan", "bob", "zoom", "spread", "rotate"]
BOB_HZ = 1.5


@dataclass(frozen=True)
class MotionClass:
    """How the targets of a class move. `rate` is the range the per-video rate is drawn from: pixels per
    second at 168 pixels of height (rise, pan, bob's peak speed), 1/s (zoom, spread) or rad/s (rotate)."""

    name: str
    flow: Flow
    rate: tuple[float, float]
    reverse: bool = False  # the video is rendered backwards: the time mirror of `flow`
    hz: float = BOB_HZ  # bob: up-and-down cycles a second


SYNTHETIC_MOTIONS = (
    MotionClass("up_slow", "rise", (60.0, 90.0)),
    MotionClass("down_slow", "rise", (60.0, 90.0), reverse=True),
    MotionClass("up_fast", "rise", (150.0, 200.0)),
    MotionClass("down_fast", "rise", (150.0, 200.0), reverse=True),
    MotionClass("horizontal", "pan", (60.0, 200.0)),  # left or right: one class, as a flip swaps them
    MotionClass("expand", "zoom", (1.1, 1.6)),
    MotionClass("contract", "zoom", (1.1, 1.6), reverse=True),
    MotionClass("rotate", "rotate", (1.1, 1.6)),  # either way round: a flip swaps them
    MotionClass("still", "still", (0.0, 0.0)),
    MotionClass("spread", "spread", (1.3, 1.9)),  # away from a vertical line, both sides
    MotionClass("squeeze", "spread", (1.3, 1.9), reverse=True),
    MotionClass("bob", "bob", (100.0, 140.0)),  # up and down, 1.5 times a second, each object its own phase
)
SYNTHETIC_CLASSES = [motion.name for motion in SYNTHETIC_MOTIONS]

HARD_MOTIONS = (
    MotionClass("up_slow", "rise", (35.0, 50.0)),
    MotionClass("down_slow", "rise", (35.0, 50.0), reverse=True),
    MotionClass("up_fast", "rise", (75.0, 100.0)),
    MotionClass("down_fast", "rise", (75.0, 100.0), reverse=True),
    MotionClass("sideways_slow", "pan", (35.0, 50.0)),
    MotionClass("sideways_fast", "pan", (75.0, 100.0)),
    MotionClass("expand", "zoom", (0.5, 0.8)),
    MotionClass("contract", "zoom", (0.5, 0.8), reverse=True),
    MotionClass("rotate_slow", "rotate", (0.35, 0.5)),
    MotionClass("rotate_fast", "rotate", (0.8, 1.1)),
    MotionClass("bob_slow", "bob", (60.0, 80.0), hz=1.0),
    MotionClass("bob_fast", "bob", (60.0, 80.0), hz=2.0),
)


@dataclass(frozen=True)
class Difficulty:
    """What a difficulty renders, and the size of its set when the user does not say."""

    motions: tuple[MotionClass, ...]
    classes: int  # default number of classes (the first ones)
    videos_per_class: int  # default, train and test together
    test_every: int  # one in this many videos of each class (at least one) is a test video
    targets_per_frame: float  # expected number on screen, in every class
    decoys_per_frame: float  # objects that move like the targets of another class, drawn per video
    pace_spread: float  # each target (and decoy) moves at the video's rate times 1 +- this
    shake: float  # px at 168 pixels of height: the largest camera-shake offset on each axis
    background_speed: float  # px/s, the most; direction uniform
    scene_videos: int  # consecutive videos of a class (in one split) that share a background, as UCF101's groups
    # share a setting


DIFFICULTIES = {
    "normal": Difficulty(
        motions=SYNTHETIC_MOTIONS,
        classes=8,
        videos_per_class=60,
        test_every=5,
        targets_per_frame=16.0,
        decoys_per_frame=0.0,
        pace_spread=0.0,
        shake=0.0,
        background_speed=50.0,  # slower than the targets so they stand out
        scene_videos=1,
    ),
    "hard": Difficulty(
        motions=HARD_MOTIONS,
        classes=len(HARD_MOTIONS),
        videos_per_class=24,
        test_every=3,
        targets_per_frame=14.0,
        decoys_per_frame=4.0,
        pace_spread=0.15,
        shake=2.0,
        background_speed=60.0,  # faster than the slow targets
        scene_videos=3,  # two overfit little, four leave the baseline near 20% (docs/benchmarks.md)
    ),
}

LIFETIME_S = 1.0
DISTRACTORS_PER_FRAME = 4.0
DISTRACTOR_SPEED = 150.0  # px/s, the most; direction uniform
SHAKE_HZ = (1.0, 4.0)  # camera shake: three sinusoids per axis, their frequencies drawn from this range
MARGIN = 210.0  # px beyond the frame where objects spawn: covers a lifetime of travel and rotation about any centre
RADIUS = (7.0, 13.0)  # px
SHAPES = ("disc", "square", "ring", "diamond", "cross")
NOISE_SIGMA = 3.0


def render_video(
    class_index: int,
    video_seed: int,
    frames: int = 125,
    fps: float = 25.0,
    width: int = WIDTH,
    height: int = HEIGHT,
    difficulty: str = "normal",
    scene_seed: int | None = None,
) -> np.ndarray:
    """The frames (T, H, W, 3) uint8 of one video of class `class_index`; the same seed gives the same frames.
    Lengths scale with `height`: an 84-pixel-high video is the 168-pixel one at half size. Videos of the same
    `scene_seed` share their background texture (default: the video's own)."""
    spec = _difficulty(difficulty)
    if not 0 <= class_index < len(spec.motions):
        raise ValueError(f"class index {class_index} is not one of 0..{len(spec.motions) - 1} ({difficulty})")
    motion = spec.motions[class_index]
    rng = np.random.default_rng(video_seed)
    # what only the hard set draws comes from a second stream, so the normal set's videos stay as they were
    extra = np.random.default_rng([video_seed, 1])
    unit = height / HEIGHT
    shake = _shake(extra, spec.shake * unit, frames, fps)
    objects = _objects(motion, spec, rng, extra, frames, fps, width, height, unit)
    objects["x"] += shake[:, :1]
    objects["y"] += shake[:, 1:]
    background = _background(rng if scene_seed is None else np.random.default_rng(scene_seed), width, height, unit)
    video = _draw(objects, background, rng, shake, spec.background_speed, frames, fps, width, height, unit)
    return np.ascontiguousarray(video[::-1]) if motion.reverse else video


def _difficulty(name: str) -> Difficulty:
    if name not in DIFFICULTIES:
        raise ConfigError(f"synthetic: unknown difficulty {name!r}; use one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


def _objects(
    motion: MotionClass,
    spec: Difficulty,
    rng: np.random.Generator,
    extra: np.random.Generator,
    frames: int,
    fps: float,
    width: int,
    height: int,
    unit: float,
) -> dict[str, np.ndarray]:
    """Targets, distractors and decoys, per frame and object (T, N), back to front: centre (x, y), shape,
    radius, colour."""
    rate = rng.uniform(*motion.rate)
    centre = (rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height)
    sign = rng.choice([-1.0, 1.0])
    targets = _spawn(rng, spec.targets_per_frame / _thinning(motion, rate), frames, fps, width, height, unit)
    distractors = _spawn(rng, DISTRACTORS_PER_FRAME, frames, fps, width, height, unit)
    _pace(extra, spec.pace_spread, targets)
    targets["x"], targets["y"] = _flow(motion, rate, unit, centre, sign, targets)
    distractors["x"], distractors["y"] = _drift(distractors)
    groups = [targets, distractors, _decoys(motion, spec, extra, frames, fps, width, height, unit)]
    depth = rng.permutation(sum(group["age"].shape[1] for group in groups))  # overlapping one another at random
    return {
        key: np.concatenate([group[key] for group in groups], axis=1)[:, depth]
        for key in ("x", "y", "shape", "radius", "colour")
    }


def _decoys(
    motion: MotionClass,
    spec: Difficulty,
    rng: np.random.Generator,
    frames: int,
    fps: float,
    width: int,
    height: int,
    unit: float,
) -> dict[str, np.ndarray]:
    """Objects that move as the targets of another class of the set would (its own rate, centre and sign), in
    the finished video: played backwards before the video is, when one of the two is a time mirror."""
    others = [other for other in spec.motions if other != motion]
    decoy = others[rng.integers(len(others))]
    rate = rng.uniform(*decoy.rate)
    centre = (rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height)
    sign = rng.choice([-1.0, 1.0])
    decoys = _spawn(rng, spec.decoys_per_frame / _thinning(decoy, rate), frames, fps, width, height, unit)
    if decoy.reverse != motion.reverse:
        decoys["age"] = LIFETIME_S - decoys["age"]
    _pace(rng, spec.pace_spread, decoys)
    decoys["x"], decoys["y"] = _flow(decoy, rate, unit, centre, sign, decoys)
    return decoys


def _pace(rng: np.random.Generator, spread: float, objects: dict[str, np.ndarray]) -> None:
    """Give each object its own pace, 1 +- `spread`: its clock runs that much faster, so it moves that much
    faster along its flow (with `spread` 0 the ages are unchanged)."""
    objects["age"] = objects["age"] * (1 + rng.uniform(-spread, spread, objects["age"].shape[1]))


def _shake(rng: np.random.Generator, amplitude: float, frames: int, fps: float) -> np.ndarray:
    """Camera shake: the offset (T, 2) in px of the whole picture in each frame, three sinusoids of random
    frequency and phase per axis, together at most `amplitude` on each (zeros for 0)."""
    hz = rng.uniform(*SHAKE_HZ, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    seconds = np.arange(frames)[:, None, None] / fps
    return amplitude / 3 * np.sin(2 * np.pi * hz * seconds + phase).sum(axis=1)


def _draw(
    objects: dict[str, np.ndarray],
    background: np.ndarray,
    rng: np.random.Generator,
    shake: np.ndarray,
    background_speed: float,
    frames: int,
    fps: float,
    width: int,
    height: int,
    unit: float,
) -> np.ndarray:
    """Paint the objects over the background texture (H, W, 3), drifting and shaking (by `shake` (T, 2) px), with
    fresh grain in every frame: (T, H, W, 3) uint8."""
    x, y, radius = objects["x"], objects["y"], objects["radius"]
    frame_of, index = np.nonzero((x > -radius) & (x < width + radius) & (y > -radius) & (y < height + radius))
    size = 2 * math.ceil(RADIUS[1] * unit) + 3
    coverage, left, top = _coverage(
        x[frame_of, index], y[frame_of, index], objects["shape"][frame_of, index], radius[frame_of, index], size
    )
    paint = objects["colour"][frame_of, index].astype(np.float32)[:, None, None, :]
    left, top = (left + size).tolist(), (top + size).tolist()  # into a canvas padded by `size` on every side
    first = np.searchsorted(frame_of, np.arange(frames + 1)).tolist()

    grain_reach = NOISE_SIGMA * 3**0.5  # uniform grain of standard deviation NOISE_SIGMA reaches this far
    # the background stays clear of 0 and 255 by the grain's reach, as the objects' colours do: no clipping per frame
    background = np.clip(background, grain_reach, 255 - grain_reach)
    background = np.tile(background, (2, 2, 1))  # it tiles: any shift is one slice
    heading = rng.uniform(0, 2 * np.pi)
    drift = rng.uniform(0, background_speed * unit) * np.array([np.cos(heading), np.sin(heading)])
    canvas = np.zeros((height + 2 * size, width + 2 * size, 3), np.float32)
    screen = canvas[size : size + height, size : size + width]
    frame = np.empty((height, width, 3), np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        dx, dy = np.round(drift * t / fps + shake[t]).astype(int)
        screen[...] = background[dy % height : dy % height + height, dx % width : dx % width + width]
        # premultiplied, per frame: each sprite then costs two in-place operations
        now = slice(first[t], first[t + 1])
        keep = np.repeat(1 - coverage[now], 3, axis=-1)
        ink = coverage[now] * paint[now]
        for k, (y0, x0) in enumerate(zip(top[now], left[now], strict=True)):  # back to front
            patch = canvas[y0 : y0 + size, x0 : x0 + size]
            patch *= keep[k]
            patch += ink[k]
        # grey grain, uniform rather than Gaussian: as good here, and cheaper to draw
        grain = np.repeat(rng.random((height, width, 1), dtype=np.float32), 3, axis=-1)
        grain -= 0.5
        grain *= 2 * grain_reach
        out[t] = np.add(screen, grain, out=frame)
    return out


def _spawn(
    rng: np.random.Generator, on_screen: float, frames: int, fps: float, width: int, height: int, unit: float
) -> dict[str, np.ndarray]:
    """Objects spawned uniformly over the frame and a MARGIN around it, `on_screen` of them in the frame at a
    time; each is reborn every LIFETIME_S with a new look and place, at a random phase so that ages are
    uniform from the first frame. Per frame and object (T, N): its age (s) and its current life's start
    (x0, y0), look (shape, radius, colour), distractor speed and random angle."""
    margin = MARGIN * unit
    count = round(on_screen * (width + 2 * margin) * (height + 2 * margin) / (width * height))
    lifetime = LIFETIME_S * fps
    lives = math.ceil(frames / lifetime) + 1
    clock = np.arange(frames)[:, None] + rng.uniform(0, lifetime, count)
    life = (clock // lifetime).astype(int)
    per_life = {
        "x0": rng.uniform(-margin, width + margin, (count, lives)),
        "y0": rng.uniform(-margin, height + margin, (count, lives)),
        "shape": rng.integers(0, len(SHAPES), (count, lives)),
        "radius": rng.uniform(*RADIUS, (count, lives)) * unit,
        # dark or bright whatever the tint, so every colour channel shows the object against the background;
        # 10 to 245, clear of 0 and 255 by more than the grain's reach
        "colour": rng.choice([40.0, 215.0], (count, lives, 1)) + rng.uniform(-30, 30, (count, lives, 3)),
        "speed": rng.uniform(0, DISTRACTOR_SPEED * unit, (count, lives)),
        "angle": rng.uniform(0, 2 * np.pi, (count, lives)),  # a target's bob phase, a distractor's heading
    }
    objects = {key: value[np.arange(count), life] for key, value in per_life.items()}
    objects["age"] = (clock - life * lifetime) / fps
    return objects


def _thinning(motion: MotionClass, rate: float) -> float:
    """How much the flow thins the objects it spreads, averaged over a life (1 for flows that keep areas):
    zooms get more objects so that every class shows as many."""
    growth = {"zoom": 2 * rate, "spread": rate}.get(motion.flow, 0.0) * LIFETIME_S  # log area growth over a life
    return (1 - math.exp(-growth)) / growth if growth else 1.0


def _flow(
    motion: MotionClass,
    rate: float,
    unit: float,
    centre: tuple[float, float],
    sign: float,
    objects: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Where the targets are (x, y), each (T, N), after moving for their age from their start."""
    x0, y0, age = objects["x0"], objects["y0"], objects["age"]
    cx, cy = centre
    match motion.flow:
        case "still":
            return x0, y0
        case "rise":
            return x0, y0 - rate * unit * age
        case "pan":
            return x0 + sign * rate * unit * age, y0
        case "bob":
            amplitude = rate * unit / (2 * np.pi * motion.hz)
            return x0, y0 + amplitude * np.sin(2 * np.pi * motion.hz * age + objects["angle"])
        case "zoom":
            scale = np.exp(rate * age)
            return cx + (x0 - cx) * scale, cy + (y0 - cy) * scale
        case "spread":
            return cx + (x0 - cx) * np.exp(rate * age), y0
        case "rotate":
            cos, sin = np.cos(sign * rate * age), np.sin(sign * rate * age)
            return cx + cos * (x0 - cx) - sin * (y0 - cy), cy + sin * (x0 - cx) + cos * (y0 - cy)
    raise ValueError(f"unknown flow {motion.flow!r}")


def _drift(objects: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Where the distractors are (x, y), each (T, N): each life goes straight, its own way at its own speed."""
    step = objects["speed"] * objects["age"]
    return objects["x0"] + np.cos(objects["angle"]) * step, objects["y0"] + np.sin(objects["angle"]) * step


def _coverage(
    x: np.ndarray, y: np.ndarray, shape: np.ndarray, radius: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anti-aliased masks (N, size, size, 1) of shapes centred at sub-pixel (x, y), so that slow motion stays
    smooth, and the column and row of each mask's top-left pixel."""
    left, top = np.floor(x).astype(int) - size // 2, np.floor(y).astype(int) - size // 2
    steps = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    u = np.abs((left - x).astype(np.float32)[:, None, None] + steps[None, None, :])
    v = np.abs((top - y).astype(np.float32)[:, None, None] + steps[None, :, None])
    r = radius.astype(np.float32)[:, None, None]
    distance = np.empty((len(x), size, size), np.float32)
    for number, name in enumerate(SHAPES):
        mine = shape == number
        distance[mine] = _distance(name, u[mine], v[mine], r[mine])
    return np.clip(0.5 - distance, 0, 1)[..., None], left, top


def _distance(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) from a pixel (|dx|, |dy|) from the centre to a shape of radius r."""
    match shape:
        case "disc":
            return np.hypot(u, v) - r
        case "square":
            return np.maximum(u, v) - 0.8 * r
        case "ring":
            return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
        case "diamond":
            return (u + v - r) / math.sqrt(2)
        case "cross":
            return np.minimum(np.maximum(u - 0.3 * r, v - r), np.maximum(v - 0.3 * r, u - r))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, width: int, height: int, unit: float) -> np.ndarray:
    """A greyish texture (H, W, 3) float32 of blobs and grain with faint colour; it tiles, so it can scroll."""
    grey = rng.uniform(100, 155) + rng.uniform(-12, 12, 3)
    luminance = 0.6 * _smooth_noise(rng, height, width, 1.5 * unit) + 0.8 * _smooth_noise(rng, height, width, 6 * unit)
    chroma = np.stack([_smooth_noise(rng, height, width, 8 * unit) for _ in range(3)], axis=-1)
    return (grey + 25 * luminance[..., None] + 8 * chroma).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of `sigma` px (in the Fourier domain, so it tiles), unit variance."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    spectrum = np.fft.rfft2(rng.standard_normal((height, width))) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    noise = np.fft.irfft2(spectrum, s=(height, width))
    return noise / noise.std()


@dataclass(frozen=True)
class _Video:
    """One video to make: where it goes, its difficulty, class, seeds and length."""

    path: Path
    difficulty: str
    class_index: int
    seed: int
    scene_seed: int | None  # None: a scene of its own
    frames: int
    fps: int


def generate_synthetic(
    root: Path,
    classes: int | None = None,
    videos_per_class: int | None = None,
    seed: int = 0,
    workers: int = os.cpu_count() or 1,
    fps: int = 25,
    seconds: float = 5.0,
    progress: bool = True,
    difficulty: str = "normal",
) -> Path:
    """Write the synthetic dataset under `root` (the tree in this module's docstring) and return `root`.
    `classes` and `videos_per_class` default to the difficulty's own (DIFFICULTIES).
    Returns at once when it is complete; finishes an interrupted run; refuses a folder made otherwise."""
    root = Path(root)
    spec = _difficulty(difficulty)
    classes = spec.classes if classes is None else classes
    videos_per_class = spec.videos_per_class if videos_per_class is None else videos_per_class
    names = [motion.name for motion in spec.motions]
    if not 2 <= classes <= len(names):
        raise ConfigError(
            f"synthetic: {classes} classes asked for, but there are 2 to {len(names)} in the {difficulty} set: "
            f"{', '.join(names)}"
        )
    if videos_per_class < 2:
        raise ConfigError(f"synthetic: {videos_per_class} videos per class; at least 2 (one train, one test)")
    params = {
        "version": SYNTHETIC_VERSION,
        "difficulty": difficulty,
        "classes": classes,
        "videos_per_class": videos_per_class,
        "seed": seed,
        "fps": fps,
        "seconds": seconds,
        "width": WIDTH,
        "height": HEIGHT,
        "crf": CRF,
        "preset": PRESET,
    }
    _claim(root, params)
    missing = [
        video
        for video in _videos(root, classes, videos_per_class, seed, fps, seconds, difficulty)
        if not video.path.exists()
    ]
    if not missing:
        return root
    with (
        Progress(f"synthetic videos in {root}", len(missing), "video", enabled=progress) as bar,
        # forkserver: a fork of this process, whose other threads (torch's, DALI's: the demo's, the tests') may hold
        # a lock at that moment, can leave a worker waiting on it for ever
        ProcessPoolExecutor(max(1, min(workers, len(missing))), mp_context=mp.get_context("forkserver")) as pool,
    ):
        for _ in pool.map(_write_video, missing):
            bar.update()
            bar.show()
    return root


def _videos(
    root: Path,
    classes: int,
    videos_per_class: int,
    seed: int,
    fps: int,
    seconds: float,
    difficulty: str = "normal",
) -> list[_Video]:
    """Every video of the dataset: the last of each class (one in `test_every`, at least one) are its test split.
    Where scenes are shared, runs of `scene_videos` videos share one, counted from the start of each split, so
    that no scene is in both."""
    spec = _difficulty(difficulty)
    tests = max(1, videos_per_class // spec.test_every)
    videos = []
    for label, motion in enumerate(spec.motions[:classes]):
        for index in range(videos_per_class):
            test = index >= videos_per_class - tests
            scene = (index - (videos_per_class - tests if test else 0)) // spec.scene_videos
            videos.append(
                _Video(
                    path=root / ("test" if test else "train") / motion.name / f"{motion.name}_{index:04d}.mp4",
                    difficulty=difficulty,
                    class_index=label,
                    seed=_seed(seed, label, index),
                    scene_seed=None if spec.scene_videos == 1 else _seed(seed, label, int(test), scene, 1),
                    frames=round(seconds * fps),
                    fps=fps,
                )
            )
    return videos


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _claim(root: Path, params: dict[str, Any]) -> None:
    """Make `root` a synthetic dataset of `params`, or check that it is one; synthetic.json goes first so that
    an interrupted run can be resumed, and never mixed with one of other parameters."""
    meta = root / "synthetic.json"
    if meta.exists():
        found = {"difficulty": "normal", **json.loads(meta.read_text())}  # sets made before there was a hard one
        if found != params:
            differ = ", ".join(
                f"{key} {found.get(key)!r} (asked {value!r})"
                for key, value in params.items()
                if found.get(key) != value
            )
            raise OutputExists(
                f"{root} holds a synthetic dataset made with other parameters ({differ}); "
                "delete it or pick another folder"
            )
    elif root.exists() and any(root.iterdir()):
        raise OutputExists(f"{root} is not empty and holds no synthetic.json; delete it or pick another folder")
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(meta, json.dumps(params, indent=2) + "\n")
    if not (root / "classes.txt").exists():
        motions = DIFFICULTIES[params["difficulty"]].motions[: params["classes"]]
        write_atomic(root / "classes.txt", "".join(f"{motion.name}\n" for motion in motions))


def _write_video(video: _Video) -> None:
    """Render and encode one video under a temporary name, then rename it: a file that exists is complete."""
    video.path.parent.mkdir(parents=True, exist_ok=True)
    partial = video.path.with_name(f".{video.path.name}.partial")
    frames = render_video(
        video.class_index, video.seed, video.frames, video.fps, difficulty=video.difficulty, scene_seed=video.scene_seed
    )
    # one thread and bitexact flags: the same frames give the same bytes on any machine with this ffmpeg
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{WIDTH}x{HEIGHT}", framerate=video.fps)
    stream = ffmpeg.output(
        stream,
        str(partial),
        format="mp4",
        vcodec="libx264",
        preset=PRESET,
        crf=CRF,
        pix_fmt="yuv420p",
        threads=1,
        an=None,
        fflags="+bitexact",
        **{"flags:v": "+bitexact"},
    )
    import imageio_ffmpeg  # here, not at import: the GPU machine, without it, collects the tests that import this

    try:
        ffmpeg.run(
            stream, cmd=imageio_ffmpeg.get_ffmpeg_exe(), input=frames.tobytes(), quiet=True, overwrite_output=True
        )
    except ffmpeg.Error as error:
        raise RunFailed(
            f"ffmpeg could not encode {video.path}: {error.stderr.decode(errors='replace')[-2000:]}"
        ) from None
    os.replace(partial, video.path)
