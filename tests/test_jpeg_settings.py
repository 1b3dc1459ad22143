"""The JPEG settings preprocess writes (quality, 4:2:0, baseline, Huffman tables) and that DALI's CPU decoder reads
them (tests/test_gpu.py: its GPU decoders); what a run costs on disk, reported at its end; datasets written before
these settings still read."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from clipdata import dali_decoded, default_strips, noise_frames
from PIL import Image

from dali_skd.config import PreprocessConfig
from dali_skd.format import SampleMeta, ShardManifest
from preprocess.run import run_preprocess
from preprocess.shards import merge_parts
from preprocess.transcode import DEFAULT_QUALITY

# IJG's luminance quantisation table (JPEG Annex K), in natural order, and the zigzag order a DQT segment holds
IJG_LUMINANCE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
ZIGZAG = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61,
    54, 47, 55, 62, 63,
]  # fmt: skip
# Annex K's DC luminance Huffman table: code counts by length 1-16, then the symbols
STANDARD_DC_LUMINANCE = bytes([0, 0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, *range(12)])
SOF_BASELINE, SOF_PROGRESSIVE, DQT, DHT, SOS = 0xC0, 0xC2, 0xDB, 0xC4, 0xDA


def segments(jpeg: bytes) -> dict[int, list[bytes]]:
    """The marker segments of a JPEG up to its scan: {marker: [payload, ...]}."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    found: dict[int, list[bytes]] = {}
    at = 2
    while True:
        assert jpeg[at] == 0xFF
        marker, length = jpeg[at + 1], int.from_bytes(jpeg[at + 2 : at + 4], "big")
        found.setdefault(marker, []).append(jpeg[at + 4 : at + 2 + length])
        if marker == SOS:
            return found
        at += 2 + length


def huffman_tables(dht_payloads: list[bytes]) -> list[bytes]:
    """Each table of the DHT segments: its class and id byte, its 16 counts and its symbols."""
    tables = []
    for payload in dht_payloads:
        while payload:
            size = 17 + sum(payload[1:17])
            tables.append(payload[:size])
            payload = payload[size:]
    return tables


def check_written_as(jpeg: bytes, quality: int, optimize_huffman: bool) -> None:
    """Baseline sequential, 4:2:0, quantised at `quality` (libjpeg's scaling of the IJG table), Huffman tables fitted to
    the image or Annex K's."""
    found = segments(jpeg)
    assert SOF_BASELINE in found and SOF_PROGRESSIVE not in found, sorted(found)
    sof = found[SOF_BASELINE][0]
    components = [(sof[6 + 3 * i], sof[7 + 3 * i]) for i in range(sof[5])]
    assert [sampling for _, sampling in components] == [0x22, 0x11, 0x11]  # Y 2x2, Cb and Cr 1x1: 4:2:0
    tables = {}
    for payload in found[DQT]:
        while payload:
            assert payload[0] >> 4 == 0  # 8-bit entries, as baseline requires
            tables[payload[0] & 15], payload = list(payload[1:65]), payload[65:]
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    expected = [min(255, max(1, (IJG_LUMINANCE[i] * scale + 50) // 100)) for i in ZIGZAG]
    assert tables[0] == expected
    assert (STANDARD_DC_LUMINANCE in huffman_tables(found[DHT])) is not optimize_huffman


def first_strip(out: Path) -> tuple[SampleMeta, bytes]:
    shard = next(out.glob("*/*.tar"))
    with tarfile.open(shard) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}  # type: ignore[union-attr]
    meta = SampleMeta.from_json(members["json"], str(shard))
    return meta, members["jpgs"][: meta.strip_offsets[1]]


@pytest.mark.parametrize(
    "flags",
    [{}, {"quality": 90, "frames_per_jpeg": 8, "optimize_huffman": False}],
    ids=["defaults", "the-old-defaults"],
)
def test_preprocess_writes_the_jpeg_settings_it_records(
    tmp_path: Path, sample_videos: dict[str, Path], flags: dict
) -> None:
    place = tmp_path / "videos" / "a" / "clip.avi"
    place.parent.mkdir(parents=True)
    shutil.copy(sample_videos["landscape"], place)
    cfg = PreprocessConfig(dataset="folder", root=str(tmp_path / "videos"), out=str(tmp_path / "out"), **flags)
    run_preprocess(cfg, progress=False)
    manifest = ShardManifest.load(tmp_path / "out")
    quality = flags.get("quality", DEFAULT_QUALITY["jpeg"])
    optimize = flags.get("optimize_huffman", PreprocessConfig().optimize_huffman)
    assert (manifest.quality, manifest.frames_per_jpeg, manifest.optimize_huffman) == (
        quality,
        flags.get("frames_per_jpeg", PreprocessConfig().frames_per_jpeg),
        optimize,
    )
    meta, strip = first_strip(tmp_path / "out")
    check_written_as(strip, quality, optimize)
    assert meta.frames_per_jpeg == manifest.frames_per_jpeg


def test_the_default_strips_are_baseline_and_dali_cpu_decodes_them_as_pillow_does() -> None:
    frames = noise_frames(20, seed=3, height=128, width=170)
    strips = default_strips(frames)
    for strip in strips:
        check_written_as(strip, DEFAULT_QUALITY["jpeg"], PreprocessConfig().optimize_huffman)
    for strip, decoded in zip(strips, dali_decoded(strips, "cpu"), strict=True):
        pillow = np.asarray(Image.open(io.BytesIO(strip)).convert("RGB"))
        assert decoded.shape == pillow.shape and np.array_equal(decoded, pillow)


# --- what a run costs on disk ------------------------------------------------------------------------------------


@pytest.fixture
def nine_videos(tmp_path: Path, sample_videos: dict[str, Path]) -> Path:
    for i in range(9):
        kind = ("landscape", "portrait", "other_pattern")[i % 3]
        target = tmp_path / "videos" / f"class{i % 3}" / f"{i}{sample_videos[kind].suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_videos[kind], target)
    return tmp_path / "videos"


def folder_config(root: Path, out: Path, **fields: object) -> PreprocessConfig:
    return PreprocessConfig(dataset="folder", root=str(root), out=str(out), val_fraction=0.34, workers=2, **fields)


def test_the_summary_gives_the_cost_per_video_and_second_and_against_the_sources(
    tmp_path: Path, nine_videos: Path
) -> None:
    summary = run_preprocess(folder_config(nine_videos, tmp_path / "out"), progress=False)
    manifest = ShardManifest.load(tmp_path / "out")
    shard_bytes = sum(s.bytes for info in manifest.splits.values() for s in info.shards)
    sources = sum(p.stat().st_size for p in nine_videos.rglob("*.*"))
    seconds = sum(info.seconds for info in manifest.splits.values())
    assert sum(info.source_bytes for info in manifest.splits.values()) == sources
    assert seconds == pytest.approx(9 * 1.0)  # nine 1 s videos at 25 fps
    text = summary.format()
    assert f"{shard_bytes / 9 / 1e3:,.1f} kB a video" in text or f"{shard_bytes / 9 / 1e3:,.0f} kB a video" in text
    assert f"{shard_bytes / sources:.2f}x the" in text and "a video-second (1.0 s a video)" in text
    assert "the whole dataset" not in text  # every video was taken: nothing to project


@pytest.mark.parametrize("flags", [{"limit": 1}, {"part": "2/3"}], ids=["limit", "part"])
def test_a_partial_run_projects_the_whole_dataset(tmp_path: Path, nine_videos: Path, flags: dict) -> None:
    summary = run_preprocess(folder_config(nine_videos, tmp_path / "out", **flags), progress=False)
    manifest = ShardManifest.load(tmp_path / "out") if "limit" in flags else None
    taken = sum(summary.samples.values())
    assert taken == (2 if "limit" in flags else 3)  # limit: one of each split; part 2/3: a third of each
    if manifest is not None:
        assert all(info.samples == 1 for info in manifest.splits.values())
    lines = [line for line in summary.format().splitlines() if "the whole dataset" in line]
    assert len(lines) == 1 and f"this run took {taken} of its 9 videos" in lines[0], summary.format()
    assert "train 6 videos" in lines[0] and "test 3 videos" in lines[0]


def test_merged_parts_add_up_the_seconds_and_source_bytes(tmp_path: Path, nine_videos: Path) -> None:
    single = tmp_path / "single"
    run_preprocess(folder_config(nine_videos, single), progress=False)
    parts = tmp_path / "parts"
    for part in ("1/2", "2/2"):
        run_preprocess(folder_config(nine_videos, parts, part=part), progress=False)
    merged, whole = merge_parts(parts), ShardManifest.load(single)
    for name, info in merged.splits.items():
        assert info.seconds == pytest.approx(whole.splits[name].seconds)
        assert info.source_bytes == whole.splits[name].source_bytes


def test_a_dataset_written_before_these_settings_reads_and_reports_what_it_knows(
    tmp_path: Path, nine_videos: Path
) -> None:
    out = tmp_path / "out"
    run_preprocess(folder_config(nine_videos, out, quality=90, optimize_huffman=False), progress=False)
    raw = json.loads((out / "manifest.json").read_text())
    del raw["optimize_huffman"]
    for info in raw["splits"].values():
        del info["seconds"], info["source_bytes"]
    (out / "manifest.json").write_text(json.dumps(raw))
    manifest = ShardManifest.load(out)
    assert manifest.optimize_huffman is False and manifest.quality == 90
    assert all(info.seconds is None and info.source_bytes is None for info in manifest.splits.values())
    assert manifest.preprocessing()["optimize_huffman"] is False

    from preprocess.run import DiskCost

    (line,) = DiskCost(manifest.splits, taken={}, listed={}).lines()
    assert "a video" in line and "video-second" not in line and "source files" not in line


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("optimize_huffman", "yes", 'optimize_huffman is "yes"; expected true or false'),
        ("splits.train.seconds", -1, "splits.train.seconds is -1; expected a number of seconds ≥ 0"),
        ("splits.train.source_bytes", 1.5, "splits.train.source_bytes is 1.5; expected a whole number"),
    ],
)
def test_the_new_manifest_fields_are_checked(
    tmp_path: Path, nine_videos: Path, field: str, value: object, expected: str
) -> None:
    out = tmp_path / "out"
    run_preprocess(folder_config(nine_videos, out, limit=1), progress=False)
    raw = json.loads((out / "manifest.json").read_text())
    *path, last = field.split(".")
    target = raw
    for name in path:
        target = target[name]
    target[last] = value
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        ShardManifest.from_dict(raw, "manifest.json")
