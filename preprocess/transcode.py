"""One video in, one sample's frames out.

A single ffmpeg process (its command line built with ffmpeg-python) decodes the first video stream that is
not cover art, applies the rotation stored with it, resamples to a constant frame rate, and scales the shorter
side to `short_side` (aspect kept, both sides even). For `jpeg` it pipes RGB frames out as PPM and Pillow packs
every `frames_per_jpeg` of them, stacked vertically, into one JPEG strip; for `vp9` it writes a webm; for `h264`
an mp4 (not a shard format: the videos `cli.py bench`'s peer loaders read, the form other loaders keep). There is no
ffprobe: what a sample's metadata needs (frame rate, sizes, frame count) and why a video failed are read from
the same ffmpeg run's log, so each video costs one process.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import ffmpeg
from PIL import Image

from dali_skd.format import ShardFormat, pack_strips

TranscodeFormat = ShardFormat | Literal["h264"]
# JPEG quality (docs/benchmarks.md, "Shard settings": 0.4x the bytes of 90; any accuracy cost hidden by noise);
# VP9 CRF; x264 CRF (its own default)
DEFAULT_QUALITY: dict[str, int] = {"jpeg": 50, "vp9": 32, "h264": 23}
CONTAINERS = {"vp9": "webm", "h264": "mp4"}  # the file a video format is written to
VP9_KEYFRAME_INTERVAL = 16  # one clip: the loader seeks to a keyframe at most a clip before its start
VP9_CPU_USED = 2  # libvpx speed preset: a third faster than its default (1) for 3% more bytes at 128 px
TRUNCATED_FRACTION = 0.9  # with decode errors, fewer frames than this share of the duration means a cut-off file

_PPM_HEADER = re.compile(rb"P6\n(\d+) (\d+)\n255\n")
_LOG_LEVEL = re.compile(r"\[(error|fatal)\] (.*)")
_INPUT = re.compile(r"^\[info\] Input #0, (.+), from '")
_DURATION = re.compile(r"^\[info\]\s+Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_OUTPUT_VIDEO = re.compile(r"Stream #0:0.*: Video: .*?, (\d+)x(\d+)\b.*?, ([\d.]+)(k?) fps\b")
_FRAME_COUNT = re.compile(r"^\[info\] frame=\s*(\d+)")  # the final report


class VideoError(Exception):
    """This one video cannot be used; the message is the reason written to failed.jsonl."""


@dataclass(frozen=True)
class TranscodeSettings:
    ffmpeg: str  # the binary
    format: TranscodeFormat
    short_side: int
    fps: float | None  # None: keep the source's frame rate
    quality: int
    frames_per_jpeg: int
    optimize_huffman: bool = False  # jpeg: Huffman tables fitted to each strip (2-3% fewer bytes, same pixels)


@dataclass
class EncodedVideo:
    """The stored frames of one video: JPEG strips end to end (format `jpeg`), a webm (`vp9`) or an mp4 (`h264`)."""

    format: TranscodeFormat
    frames: int
    fps: float
    width: int
    height: int
    media: bytes
    strip_offsets: tuple[int, ...] = ()  # jpeg: strip i is media[strip_offsets[i]:strip_offsets[i + 1]]
    source_bytes: int = 0  # the size of the file it was made from

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


@dataclass
class FfmpegLog:
    """What one ffmpeg run said about its input and output (`-loglevel level+info`)."""

    demuxer: str | None = None
    duration: float | None = None  # of the input container, seconds
    width: int | None = None  # of the output video
    height: int | None = None
    fps: float | None = None  # of the output video, as ffmpeg prints it (2 decimals)
    frames: int | None = None  # frames written, from the final report
    errors: list[str] = field(default_factory=list)  # messages of the error and fatal lines
    fatal: list[str] = field(default_factory=list)  # messages of the fatal lines: why ffmpeg gave up

    @classmethod
    def parse(cls, text: str) -> FfmpegLog:
        log = cls()
        in_output = False
        for line in text.splitlines():
            if match := _LOG_LEVEL.search(line):
                log.errors.append(match[2].strip())
                if match[1] == "fatal":
                    log.fatal.append(match[2].strip())
            elif match := _INPUT.match(line):
                log.demuxer = match[1]
            elif match := _DURATION.match(line):
                log.duration = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
            elif "Output #0" in line:
                in_output = True
            elif in_output and log.width is None and (match := _OUTPUT_VIDEO.search(line)):
                log.width, log.height = int(match[1]), int(match[2])
                log.fps = float(match[3]) * (1000 if match[4] else 1)
            elif match := _FRAME_COUNT.match(line):
                log.frames = int(match[1])
        return log

    def failure(self, returncode: int) -> str:
        """The reason a failed run gives, short enough for one line of failed.jsonl."""
        if any("matches no streams" in e for e in self.errors):
            return "no video stream"
        message = (self.fatal or self.errors or [f"exited with status {returncode}"])[-1]
        if message.startswith("Error "):  # "Error opening input files: Invalid data found ...": keep the cause
            message = message.rsplit(": ", 1)[-1]
        return f"ffmpeg: {message.rstrip('.')}"[:200]


def ffmpeg_command(source: Path, settings: TranscodeSettings, output: str) -> list[str]:
    """The ffmpeg command line that writes `source`'s frames to `output` (a pipe for jpeg, else a file)."""
    short, half = settings.short_side, settings.short_side // 2
    portrait = "lte(iw*sar,ih)"  # in display pixels (sample aspect applied), after the rotation ffmpeg applies
    video = (
        ffmpeg.input(f"file:{source}")["V:0"]  # `V`: a video stream that is not cover art
        .filter("fps", fps=settings.fps or "source_fps")
        .filter(
            "scale",
            w=f"if({portrait},{short},2*round({half}*iw*sar/ih))",  # the long side: to the nearest even size
            h=f"if({portrait},2*round({half}*ih/(iw*sar)),{short})",
        )
        .filter("setsar", 1)
    )
    if settings.format == "jpeg":
        stream = video.output(output, format="image2pipe", vcodec="ppm", pix_fmt="rgb24", fps_mode="passthrough")
    elif settings.format == "h264":  # x264's defaults otherwise (preset medium, a keyframe at most every 250 frames)
        stream = video.output(
            output, format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=settings.quality, fps_mode="passthrough",
            map_metadata=-1, fflags="+bitexact", **{"flags:v": "+bitexact"},
        )  # fmt: skip
    else:
        stream = video.output(
            output,
            format="webm",
            vcodec="libvpx-vp9",
            pix_fmt="yuv420p",
            crf=settings.quality,
            g=VP9_KEYFRAME_INTERVAL,
            fps_mode="passthrough",
            map_metadata=-1,
            fflags="+bitexact",  # no random ids or version strings: the same input gives the same bytes
            **{"b:v": 0, "row-mt": 1, "cpu-used": VP9_CPU_USED, "flags:v": "+bitexact"},
        )
    return stream.global_args("-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info", "-y").compile(
        cmd=settings.ffmpeg
    )


def transcode(source: Path, settings: TranscodeSettings) -> EncodedVideo:
    """Decode, resample and scale `source`; raise VideoError with the reason when it cannot be used."""
    if not source.is_file():
        raise VideoError("missing")
    source_bytes = source.stat().st_size
    if source_bytes == 0:
        raise VideoError("zero-byte file")
    with (
        tempfile.TemporaryFile() as log_file,
        tempfile.TemporaryFile() as jpeg_file,
        tempfile.TemporaryDirectory(prefix="dali-skd-") as scratch,
    ):
        jpeg = settings.format == "jpeg"
        video_file = Path(scratch) / f"video.{'ppm' if jpeg else CONTAINERS[settings.format]}"  # jpeg: a pipe
        frames, width, height, strips = 0, 0, 0, []
        read_error: VideoError | None = None
        with subprocess.Popen(
            ffmpeg_command(source, settings, "pipe:" if jpeg else str(video_file)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if jpeg else subprocess.DEVNULL,
            stderr=log_file,  # a file, not a pipe: a chatty decoder can never block ffmpeg
        ) as process:
            try:
                if process.stdout is not None:
                    frames, width, height, strips = _jpeg_strips(process.stdout, settings, jpeg_file)
            except VideoError as e:
                read_error = e
                process.kill()
            except BaseException:
                process.kill()
                raise
        log_file.seek(0)
        log = FfmpegLog.parse(log_file.read().decode(errors="replace"))
        if read_error is not None and process.returncode in (0, -signal.SIGKILL):
            raise read_error
        if process.returncode != 0:
            raise VideoError(log.failure(process.returncode))
        if jpeg:
            media, strip_offsets = pack_strips(strips)
        else:
            media, strip_offsets = video_file.read_bytes(), ()
            frames, width, height = log.frames or 0, log.width or 0, log.height or 0
    _check_decoded(log, frames, settings)
    fps = settings.fps or log.fps
    if fps is None or width < 1 or height < 1:
        raise VideoError("ffmpeg did not report the output's frame rate and size")
    return EncodedVideo(settings.format, frames, fps, width, height, media, strip_offsets, source_bytes)


def _check_decoded(log: FfmpegLog, frames: int, settings: TranscodeSettings) -> None:
    if log.demuxer is not None and (log.demuxer.endswith("_pipe") or log.demuxer == "image2"):
        raise VideoError(f"not a video: a still image ({log.demuxer})")
    if frames == 0:
        raise VideoError("no frames decoded")
    fps = settings.fps or log.fps
    if log.errors and log.duration and fps and frames < TRUNCATED_FRACTION * log.duration * fps:
        raise VideoError(
            f"truncated or corrupt: decoded {frames} of about {round(log.duration * fps)} frames ({log.errors[0]})"
        )


def _jpeg_strips(stream: BinaryIO, settings: TranscodeSettings, scratch: BinaryIO) -> tuple[int, int, int, list[bytes]]:
    """Read PPM frames until ffmpeg closes the pipe; return (frames, width, height, JPEG strips).

    The frames of a strip are read into one buffer back to back: H x W x 3 rows of frame after frame are
    already the pixels of the (k H) x W strip, so stacking copies nothing."""
    header = b"".join(stream.readline() for _ in range(3))
    if not header:
        return 0, 0, 0, []
    match = _PPM_HEADER.fullmatch(header)
    if match is None:
        raise VideoError(f"ffmpeg wrote an unexpected frame header {header[:32]!r}")
    width, height = int(match[1]), int(match[2])
    frame_bytes, frames_per_jpeg = width * height * 3, settings.frames_per_jpeg
    strip = memoryview(bytearray(frames_per_jpeg * frame_bytes))
    frames, strips = 0, []
    while header:
        in_strip = 0
        while header and in_strip < frames_per_jpeg:
            start = in_strip * frame_bytes
            if stream.readinto(strip[start : start + frame_bytes]) != frame_bytes:
                raise VideoError("ffmpeg's output ended in the middle of a frame")
            in_strip += 1
            following = stream.read(len(header))
            if following and following != header:
                raise VideoError("the frame size changes in the middle of the video")
            header = following
        frames += in_strip
        pixels = strip[: in_strip * frame_bytes]
        strips.append(
            encode_jpeg(pixels, width, in_strip * height, settings.quality, settings.optimize_huffman, scratch)
        )
    return frames, width, height, strips


def encode_jpeg(
    rgb: memoryview | bytes, width: int, height: int, quality: int, optimize_huffman: bool, scratch: BinaryIO
) -> bytes:
    """Baseline (sequential, not progressive) JPEG, 4:2:0, of packed RGB pixels (Pillow's libjpeg-turbo), with
    Huffman tables fitted to the image or libjpeg's standard ones: what nvJPEG's hardware engine and every CPU
    decoder read. Pillow releases the GIL only while it encodes into a real file, not into BytesIO: hence
    `scratch`, a file the caller owns."""
    image = Image.frombuffer("RGB", (width, height), rgb, "raw", "RGB", 0, 1)
    scratch.seek(0)
    scratch.truncate()
    image.save(
        scratch, format="JPEG", quality=quality, subsampling="4:2:0", progressive=False, optimize=optimize_huffman
    )
    scratch.seek(0)
    return scratch.read()


def ffmpeg_version(ffmpeg_binary: str) -> str:
    """The first line of `ffmpeg -version`, for the manifest."""
    result = subprocess.run([ffmpeg_binary, "-version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else f"unknown ({ffmpeg_binary})"
