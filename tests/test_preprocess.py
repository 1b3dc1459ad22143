"""The preprocess stage on tiny real videos: transcoding, every dataset adapter, bad input, the shards and
manifest it writes, resume after a kill, and --part runs merged."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from clickit import invoke
from conftest import lock_held_elsewhere
from PIL import Image

from dali_skd.config import PreprocessConfig
from dali_skd.format import (
    SampleMeta,
    ShardManifest,
    sample_members,
    split_member_name,
    strip_checksums,
    strip_count,
)
from preprocess.bench import bench_preprocess
from preprocess.datasets import PreprocessError
from preprocess.run import find_ffmpeg, run_preprocess, transcode_settings
from preprocess.shards import merge_parts
from preprocess.synthetic import SYNTHETIC_CLASSES
from preprocess.transcode import DEFAULT_QUALITY, VideoError, transcode
from preprocess.verify import verify_dataset


def config(**fields: object) -> PreprocessConfig:
    return PreprocessConfig(**{"workers": 2, **fields})


# --- reading what a run wrote ----------------------------------------------------------------------------------


def read_dataset(out: Path) -> tuple[ShardManifest, dict[str, dict[str, bytes]]]:
    """Every sample of the shards the manifest lists, {key: {member name: bytes}}, checked on the way: the
    manifest's counts against the tars, member names and order, deterministic headers, the label, and the
    decoded frames (short side 128, the stored frame count, the stored size)."""
    manifest = ShardManifest.load(out)
    samples: dict[str, dict[str, bytes]] = {}
    for split, info in manifest.splits.items():
        frames = short_videos = 0
        for shard in info.shards:
            path = out / shard.path
            assert path.stat().st_size == shard.bytes
            groups: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    assert (member.mtime, member.mode, member.uid, member.gid, member.uname) == (0, 0o644, 0, 0, "")
                    key, _ = split_member_name(member.name)
                    groups.setdefault(key, {})[member.name] = tar.extractfile(member).read()
            assert len(groups) == shard.samples
            for key, members in groups.items():
                assert key.startswith(f"{split}-") and key not in samples
                meta = SampleMeta.from_json(members[f"{key}.json"], key)
                assert int(members[f"{key}.cls"]) == meta.label
                assert manifest.classes[meta.label] == meta.label_name
                assert meta.format == manifest.format and min(meta.width, meta.height) == manifest.short_side
                assert meta.width % 2 == 0 and meta.height % 2 == 0
                names = [name for name, _ in sample_members(key, meta, b"")]  # json, cls, then the frames
                assert list(members) == names
                assert decoded_frames(meta, members[names[-1]]) == meta.frames
                frames += meta.frames
                short_videos += meta.frames < 16
                samples[key] = members
        assert info.samples == sum(s.samples for s in info.shards)
        assert (frames, short_videos) == (info.frames, info.short_videos)
    return manifest, samples


def decoded_frames(meta: SampleMeta, media: bytes) -> int:
    """Decode the stored frames; check each has the size the metadata gives; return how many there are."""
    if meta.format == "vp9":
        return webm_frames(media, (meta.width, meta.height))
    offsets = meta.strip_offsets
    assert len(offsets) == strip_count(meta.frames, meta.frames_per_jpeg) + 1 and offsets[-1] == len(media)
    count = 0
    for i in range(len(offsets) - 1):
        image = Image.open(io.BytesIO(media[offsets[i] : offsets[i + 1]]))
        image.load()
        in_strip = min(meta.frames_per_jpeg, meta.frames - i * meta.frames_per_jpeg)
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (meta.width, in_strip * meta.height))
        count += in_strip
    return count


def webm_frames(data: bytes, size: tuple[int, int], select: str = "") -> int:
    """Frames ffmpeg decodes from a webm (only those `select` passes, e.g. keyframes), each checked for `size`."""
    command = [find_ffmpeg(None), "-hide_banner", "-nostdin", "-i", "pipe:", *(["-vf", select] if select else [])]
    command += ["-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    decoded = subprocess.run(command, input=data, capture_output=True, check=True).stdout
    frame_bytes = size[0] * size[1] * 3
    assert len(decoded) % frame_bytes == 0
    return len(decoded) // frame_bytes


def read_failures(out: Path, name: str = "failed.jsonl") -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file of OUT but its lock (which names the process that last held it)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


def sources_by_split(samples: dict[str, dict[str, bytes]]) -> dict[str, set[tuple[str, int]]]:
    """{split: {(source, label)}} of the samples."""
    result: dict[str, set[tuple[str, int]]] = {}
    for key, members in samples.items():
        meta = SampleMeta.from_json(members[f"{key}.json"], key)
        result.setdefault(key.split("-")[0], set()).add((meta.source, meta.label))
    return result


# --- transcoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size", "frames"),
    [
        ("landscape", (170, 128), 25),
        ("portrait", (128, 170), 25),
        ("odd_size", (170, 128), 25),  # 65x49
        ("anamorphic", (342, 128), 25),  # 64x48 pixels twice as wide as high
        ("rotated", (128, 170), 25),  # landscape pixels with a 90 degree display rotation
        ("audio", (170, 128), 25),
        ("short", (170, 128), 10),
        ("vfr", (170, 128), 66),  # 50 frames over 66 slots of 1/25 s, made constant
    ],
)
def test_transcode_jpeg_sizes_and_frames(sample_videos: dict[str, Path], kind: str, size: tuple, frames: int) -> None:
    settings = transcode_settings(config())
    video = transcode(sample_videos[kind], settings)
    assert (video.width, video.height, video.frames, video.fps) == (*size, frames, 25.0)
    meta = SampleMeta(0, "c", "v", video.frames, video.fps, video.width, video.height, "jpeg", 8, video.strip_offsets)
    assert decoded_frames(meta, video.media) == frames


def test_transcode_resamples_to_fps_flag(sample_videos: dict[str, Path]) -> None:
    video = transcode(sample_videos["landscape"], transcode_settings(config(fps=10.0)))
    assert (video.frames, video.fps) == (10, 10.0)


def test_transcode_vp9_exact_frames_keyframes_and_same_bytes(sample_videos: dict[str, Path]) -> None:
    settings = transcode_settings(config(format="vp9"))
    video = transcode(sample_videos["vfr"], settings)
    assert (video.width, video.height, video.frames) == (170, 128, 66)
    assert webm_frames(video.media, (170, 128)) == 66
    assert webm_frames(video.media, (170, 128), select="select=key") >= math.ceil(66 / 16)
    assert transcode(sample_videos["vfr"], settings).media == video.media


def test_vp9_frames_are_addressable_by_index_in_dali(sample_videos: dict[str, Path]) -> None:
    """The loader asks DALI for frames by index up to the stored count: the last one must be there."""
    np = pytest.importorskip("numpy")
    dali = pytest.importorskip("nvidia.dali")
    video = transcode(sample_videos["landscape"], transcode_settings(config(format="vp9")))
    data = np.frombuffer(video.media, dtype=np.uint8)

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def last_frames():
        encoded = dali.fn.external_source(source=lambda: [data], batch=True)
        return dali.fn.decoders.video(encoded, device="cpu", start_frame=video.frames - 2, sequence_length=2)

    pipe = last_frames()
    pipe.build()
    (frames,) = pipe.run()
    assert np.array(frames[0]).shape == (2, video.height, video.width, 3)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("bad_zero_bytes", "zero-byte file"),
        ("bad_random_bytes", "ffmpeg: Invalid data found when processing input"),
        ("bad_text", "ffmpeg: Invalid data found when processing input"),
        ("bad_audio_only", "no video stream"),
        ("bad_truncated", "truncated or corrupt: decoded"),
        ("bad_image", "not a video: a still image"),
    ],
)
def test_transcode_rejects_bad_input(sample_videos: dict[str, Path], kind: str, reason: str) -> None:
    with pytest.raises(VideoError, match=re.escape(reason)):
        transcode(sample_videos[kind], transcode_settings(config()))


def test_transcode_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"^missing$"):
        transcode(tmp_path / "nowhere.avi", transcode_settings(config()))


# --- dataset adapters, each on a tree with its official names, run end to end ---------------------------------


def place(video: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(video, path)


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode())


def ucf101_tree(base: Path, videos: dict[str, Path]) -> Path:
    """`UCF-101/<Class>/v_<Class>_gXX_cYY.avi` and `ucfTrainTestlist/` beside it, CRLF like the official files;
    classInd deliberately not in alphabetical order (labels follow classInd)."""
    root = base / "UCF-101"
    classes = ["PlayingGuitar", "ApplyEyeMakeup"]
    write_lines(base / "ucfTrainTestlist" / "classInd.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)], "\r\n")
    train, test = [], []
    for label, name in enumerate(classes):
        for group in (1, 2, 8):
            source = f"{name}/v_{name}_g{group:02d}_c01.avi"
            place(videos["landscape" if label else "other_pattern"], root / source)
            (test if group == 1 else train).append(source)
            if group != 1:
                train[-1] += f" {label + 1}"
    write_lines(base / "ucfTrainTestlist" / "trainlist01.txt", train, "\r\n")
    write_lines(base / "ucfTrainTestlist" / "testlist01.txt", test, "\r\n")
    return root


def test_ucf101(tmp_path: Path, sample_videos: dict[str, Path]) -> None:
    root = ucf101_tree(tmp_path, sample_videos)
    summary = run_preprocess(config(dataset="ucf101", root=str(root), out=str(tmp_path / "out")), progress=False)
    manifest, samples = read_dataset(tmp_path / "out")
    assert (manifest.dataset, manifest.split_number, manifest.classes) == (
        "ucf101",
        1,
        ["PlayingGuitar", "ApplyEyeMakeup"],
    )
    assert sources_by_split(samples) == {
        "train": {(f"{c}/v_{c}_g{g:02d}_c01.avi", label) for label, c in enumerate(manifest.classes) for g in (2, 8)},
        "test": {(f"{c}/v_{c}_g01_c01.avi", label) for label, c in enumerate(manifest.classes)},
    }
    assert (summary.samples, summary.failures) == ({"train": 4, "test": 2}, 0)
    assert read_failures(tmp_path / "out") == []


def test_hmdb51(tmp_path: Path, sample_videos: dict[str, Path]) -> None:
    root = tmp_path / "hmdb51"
    splits = tmp_path / "testTrainMulti_7030_splits"
    for name in ("wave", "brush_hair"):
        lines = []
        for i, flag in enumerate((1, 1, 2, 0)):
            video = f"{name.title()}_#{i}_[u_nm_np1_fr_goo_{i}].avi"
            place(sample_videos["landscape"], root / name / video)
            lines.append(f"{video} {flag} ")
        write_lines(splits / f"{name}_test_split2.txt", lines)
        write_lines(splits / f"{name}_test_split1.txt", [f"{name.title()}_#0_[u_nm_np1_fr_goo_0].avi 2"])
    run_preprocess(config(dataset="hmdb51", root=str(root), split=2, out=str(tmp_path / "out")), progress=False)
    manifest, samples = read_dataset(tmp_path / "out")
    assert (manifest.classes, manifest.split_number) == (["brush_hair", "wave"], 2)
    assert sources_by_split(samples) == {
        "train": {
            (f"{c}/{c.title()}_#{i}_[u_nm_np1_fr_goo_{i}].avi", label)
            for label, c in enumerate(manifest.classes)
            for i in (0, 1)
        },
        "test": {(f"{c}/{c.title()}_#2_[u_nm_np1_fr_goo_2].avi", label) for label, c in enumerate(manifest.classes)},
    }


def test_kinetics400_finds_videos_anywhere_and_lists_the_missing(
    tmp_path: Path, sample_videos: dict[str, Path]
) -> None:
    root = tmp_path / "k400"
    header = "label,youtube_id,time_start,time_end,split,is_cc"
    classes = ["passing American football (in game)", "abseiling"]
    train = [f'"{classes[0]}",-abc{i},{10 * i},{10 * i + 10},train,0' for i in range(3)]
    train += [f"{classes[1]},xyz{i},{i},{i + 10},train,0" for i in range(2)]
    write_lines(root / "annotations" / "train.csv", [header, *train])
    write_lines(root / "annotations" / "validate.csv", [header, f"{classes[1]},val0,5,15,val,0"])
    place(sample_videos["landscape"], root / "train" / classes[0] / "-abc0_000000_000010.mp4")
    place(sample_videos["portrait"], root / "train" / classes[0] / "-abc1_000010_000020.mkv")
    place(sample_videos["landscape"], root / "xyz0_000000_000010.mp4")  # flat
    place(sample_videos["audio"], root / "xyz1_000001_000011.webm")
    place(sample_videos["landscape"], root / "val" / "val0_000005_000015.mp4")
    summary = run_preprocess(config(dataset="kinetics400", root=str(root), out=str(tmp_path / "out")), progress=False)
    manifest, samples = read_dataset(tmp_path / "out")
    assert manifest.classes == sorted(classes) and list(manifest.splits) == ["train", "val"]
    football = manifest.classes.index(classes[0])
    assert sources_by_split(samples)["train"] == {
        (f"train/{classes[0]}/-abc0_000000_000010.mp4", football),
        (f"train/{classes[0]}/-abc1_000010_000020.mkv", football),
        ("xyz0_000000_000010.mp4", 1 - football),
        ("xyz1_000001_000011.webm", 1 - football),
    }
    assert sources_by_split(samples)["val"] == {("val/val0_000005_000015.mp4", 1 - football)}
    assert read_failures(tmp_path / "out") == [{"source": "-abc2_000020_000030", "split": "train", "reason": "missing"}]
    assert summary.failures == manifest.failures == 1


def folder_tree(root: Path, videos: dict[str, Path]) -> Path:
    """Two classes with spaces and non-ASCII letters in their names, every usable kind of video, every bad one."""
    good = ["landscape", "portrait", "odd_size", "anamorphic", "rotated", "audio", "short", "vfr"]
    for i, kind in enumerate(good):
        place(videos[kind], root / ("Clase ñandú" if i % 2 else "jump rope") / f"vidéo {i} {kind}{videos[kind].suffix}")
    for kind in [k for k in videos if k.startswith("bad_")]:
        place(videos[kind], root / "jump rope" / f"{kind}{videos[kind].suffix}")
    (root / "jump rope" / ".DS_Store").write_bytes(b"hidden files are not videos")
    return root


def test_folder_with_every_odd_and_bad_input(tmp_path: Path, sample_videos: dict[str, Path]) -> None:
    root = folder_tree(tmp_path / "videos", sample_videos)
    cfg = config(dataset="folder", root=str(root), out=str(tmp_path / "out"), val_fraction=0.25)
    summary = run_preprocess(cfg, progress=False)
    manifest, samples = read_dataset(tmp_path / "out")
    assert manifest.classes == ["Clase ñandú", "jump rope"]
    kept = sources_by_split(samples)
    assert len(kept["train"]) == 6 and len(kept["test"]) == 2
    assert all(manifest.classes[label] == source.split("/")[0] for split in kept.values() for source, label in split)
    failures = read_failures(tmp_path / "out")
    assert {Path(f["source"]).stem: f["reason"].split(":")[0] for f in failures} == {
        "bad_zero_bytes": "zero-byte file",
        "bad_random_bytes": "ffmpeg",
        "bad_text": "ffmpeg",
        "bad_audio_only": "no video stream",
        "bad_truncated": "truncated or corrupt",
        "bad_image": "not a video",
    }
    assert summary.failures == manifest.failures == 6 and summary.short_videos == 1
    assert str(summary).count("\n") >= 3 and "6 failed" in str(summary)


def test_synthetic_generates_into_out_videos_then_lists_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = config(dataset="synthetic", out=str(out), classes=2, videos_per_class=2, seed=3)
    run_preprocess(cfg, progress=False)
    generated = sorted(p.relative_to(out / "videos").as_posix() for p in (out / "videos").glob("*/*/*.mp4"))
    assert len(generated) == 4
    manifest, samples = read_dataset(out)
    assert manifest.classes == SYNTHETIC_CLASSES[:2]
    kept = sources_by_split(samples)
    assert sorted(source for split in kept.values() for source, _ in split) == generated
    assert all(
        source.startswith(f"{split}/{manifest.classes[label]}/") for split in kept for source, label in kept[split]
    )
    # the generated videos in OUT/videos alone do not make OUT a used output folder
    for used in [p for p in out.iterdir() if p.name != "videos"]:
        shutil.rmtree(used) if used.is_dir() else used.unlink()
    run_preprocess(cfg, progress=False)
    assert read_dataset(out)[1] == samples


def test_vp9_run(tmp_path: Path, sample_videos: dict[str, Path]) -> None:
    for i, kind in enumerate(["landscape", "portrait", "short"]):
        place(sample_videos[kind], tmp_path / "videos" / f"c{i % 2}" / f"{kind}.avi")
    cfg = config(dataset="folder", root=str(tmp_path / "videos"), out=str(tmp_path / "out"), format="vp9")
    run_preprocess(cfg, progress=False)
    manifest, samples = read_dataset(tmp_path / "out")
    assert (manifest.format, manifest.quality, manifest.frames_per_jpeg) == ("vp9", 32, 0)
    assert len(samples) == 3


# --- errors a user meets ---------------------------------------------------------------------------------------


def test_errors_name_the_file_and_the_way_out(tmp_path: Path, sample_videos: dict[str, Path]) -> None:
    def error(**fields: object) -> str:
        cfg = config(out=str(tmp_path / "out"), **fields)
        with pytest.raises(PreprocessError) as caught:
            run_preprocess(cfg, progress=False)
        return str(caught.value)

    assert "--root is required" in error(dataset="ucf101")
    assert "nowhere" in error(dataset="ucf101", root=str(tmp_path / "nowhere"))
    root = ucf101_tree(tmp_path / "ucf", sample_videos)
    (tmp_path / "ucf" / "ucfTrainTestlist" / "classInd.txt").unlink()
    message = error(dataset="ucf101", root=str(root))
    assert "classInd.txt" in message and "ucfTrainTestlist" in message and "--splits-dir" in message
    root = ucf101_tree(tmp_path / "ucf2", sample_videos)
    message = error(dataset="ucf101", root=str(root), split=2)
    assert "trainlist02.txt is missing" in message and "--splits-dir" in message
    assert "--split 4" in error(dataset="ucf101", root=str(root), split=4)
    (tmp_path / "k400").mkdir()
    write_lines(tmp_path / "k400" / "train.csv", ["label,youtube_id,time_start,time_end,split", "a,b,0,10,train"])
    assert "validate.csv or val.csv" in error(dataset="kinetics400", root=str(tmp_path / "k400"))
    for part in ("0/2", "3/2", "1-2", "x/y"):
        assert "--part" in error(dataset="folder", root=str(tmp_path / "k400"), part=part)


def test_refuses_a_used_out_without_resume_and_other_settings_on_resume(
    tmp_path: Path, sample_videos: dict[str, Path]
) -> None:
    place(sample_videos["landscape"], tmp_path / "videos" / "a" / "x.avi")
    cfg = config(dataset="folder", root=str(tmp_path / "videos"), out=str(tmp_path / "out"))
    run_preprocess(cfg, progress=False)
    with pytest.raises(PreprocessError, match="--resume"):
        run_preprocess(cfg, progress=False)
    with pytest.raises(PreprocessError, match=f"quality: {DEFAULT_QUALITY['jpeg']} then, 80 now"):
        run_preprocess(dataclasses.replace(cfg, resume=True, quality=80), progress=False)
    place(sample_videos["portrait"], tmp_path / "videos" / "a" / "y.avi")
    with pytest.raises(PreprocessError, match="videos"):
        run_preprocess(dataclasses.replace(cfg, resume=True), progress=False)


# --- interruption and parts ------------------------------------------------------------------------------------


@pytest.fixture
def twelve_videos(tmp_path: Path, sample_videos: dict[str, Path]) -> Path:
    """Twelve videos in three classes (three of them unusable) for runs that are killed, resumed and split."""
    kinds = ["landscape", "portrait", "other_pattern", "short", "bad_text", "landscape"]
    for i in range(12):
        kind = kinds[i % len(kinds)] if i != 7 else "bad_zero_bytes"
        place(
            sample_videos[kind], tmp_path / "videos" / f"class {i % 3}" / f"{i:02d} {kind}{sample_videos[kind].suffix}"
        )
    return tmp_path / "videos"


def small_shards_config(root: Path, out: Path, **fields: object) -> PreprocessConfig:
    # a sample of 25 frames is about 50 kB (at the default quality): two samples a shard
    return config(dataset="folder", root=str(root), out=str(out), val_fraction=0.25, shard_size_mb=0.12, **fields)


def test_resume_after_kill_mid_shard_equals_an_uninterrupted_run(tmp_path: Path, twelve_videos: Path) -> None:
    reference = tmp_path / "reference"
    run_preprocess(small_shards_config(twelve_videos, reference), progress=False)
    assert len(ShardManifest.load(reference).splits["train"].shards) >= 3

    killed = tmp_path / "killed"
    cfg = small_shards_config(twelve_videos, killed, workers=1)
    code = (
        "from dali_skd.config import PreprocessConfig; from preprocess.run import run_preprocess; "
        f"run_preprocess(PreprocessConfig(**{dataclasses.asdict(cfg)!r}), progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    journal = killed / ".journal" / "train.jsonl"
    deadline = time.monotonic() + 60
    # kill once a shard is journaled and the next one is half written
    while not (journal.is_file() and journal.read_bytes().count(b"\n") >= 1 and any(killed.glob("train/*.tar.tmp"))):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.kill()
    process.wait()
    assert not (killed / "manifest.json").exists()

    summary = run_preprocess(dataclasses.replace(cfg, resume=True), progress=False)
    assert summary.done_before >= 1
    assert not list(killed.rglob("*.tmp"))
    assert tree_bytes(killed) == tree_bytes(reference)


def test_resume_drops_an_unjournaled_shard_and_a_half_written_journal_line(tmp_path: Path, twelve_videos: Path) -> None:
    reference = tmp_path / "reference"
    run_preprocess(small_shards_config(twelve_videos, reference), progress=False)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(reference, interrupted)
    # as if killed after renaming shard 2 but before its journal line was complete, with a manifest not yet written
    journal = interrupted / ".journal" / "train.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2]) + lines[2][:20])
    (interrupted / "train" / "shard-000003.tar.tmp").write_bytes(b"half")
    for name in ("manifest.json", "failed.jsonl", ".journal/test.jsonl"):
        (interrupted / name).unlink()
    shutil.rmtree(interrupted / "test")
    run_preprocess(small_shards_config(twelve_videos, interrupted, resume=True), progress=False)
    assert tree_bytes(interrupted) == tree_bytes(reference)


def test_parts_merged_hold_the_samples_of_one_run(tmp_path: Path, twelve_videos: Path) -> None:
    single = tmp_path / "single"
    run_preprocess(small_shards_config(twelve_videos, single), progress=False)
    parts = tmp_path / "parts"
    run_preprocess(small_shards_config(twelve_videos, parts, part="1/3"), progress=False)
    with pytest.raises(PreprocessError, match=r"manifest\.part-2-of-3\.json, manifest\.part-3-of-3\.json"):
        merge_parts(parts)
    for part in ("3/3", "2/3"):
        run_preprocess(small_shards_config(twelve_videos, parts, part=part), progress=False)
    merged = merge_parts(parts)

    single_manifest, single_samples = read_dataset(single)
    merged_manifest, merged_samples = read_dataset(parts)
    assert merged_samples == single_samples
    assert merged_manifest == ShardManifest.load(parts) == merged
    for split, info in merged_manifest.splits.items():
        expected = single_manifest.splits[split]
        assert (info.samples, info.frames, info.short_videos) == (
            expected.samples,
            expected.frames,
            expected.short_videos,
        )
        assert all(re.fullmatch(r"\w+/shard-p0[123]of03-\d{6}\.tar", shard.path) for shard in info.shards)
    assert merged_manifest.failures == single_manifest.failures == 3
    assert (parts / "failed.jsonl").read_bytes() == (single / "failed.jsonl").read_bytes()


@pytest.mark.slow
def test_checksums_of_every_strip_webm_and_shard_file(tmp_path: Path, twelve_videos: Path) -> None:
    """Recorded as written, kept through --part runs merged, and what `preprocess verify` then finds intact."""
    parts = tmp_path / "parts"
    for part in ("1/2", "2/2"):
        run_preprocess(small_shards_config(twelve_videos, parts, part=part), progress=False)
    merge_parts(parts)
    vp9 = tmp_path / "vp9"
    run_preprocess(small_shards_config(twelve_videos, vp9, format="vp9", part="1/4"), progress=False)
    (vp9 / "manifest.part-1-of-4.json").rename(vp9 / "manifest.json")
    formats = set()
    for out in (parts, vp9):
        manifest, samples = read_dataset(out)
        formats.add(manifest.format)
        for info in manifest.splits.values():
            for shard in info.shards:
                assert shard.crc32 == zlib.crc32((out / shard.path).read_bytes())
        for key, members in samples.items():
            meta = SampleMeta.from_json(members[f"{key}.json"], key)
            if meta.format == "jpeg":
                media = members[f"{key}.jpgs"]
                assert meta.strip_crc32 == strip_checksums(media, meta.strip_offsets) and len(meta.strip_crc32) > 1
            else:
                assert meta.media_crc32 == zlib.crc32(members[f"{key}.webm"]) and meta.strip_crc32 == ()
        summary = verify_dataset(str(out), workers=2)
        assert not summary.damaged and all(shard.whole_file for shard in summary.shards) and samples
    assert formats == {"jpeg", "vp9"}


def test_a_second_run_into_a_locked_out_fails_at_once_naming_the_holder(tmp_path: Path, twelve_videos: Path) -> None:
    out = tmp_path / "out"
    args = ["preprocess", "--dataset", "folder", "--root", str(twelve_videos), "--out", str(out), "--workers", "1"]
    with lock_held_elsewhere(out) as holder:
        message = invoke(*args, expect_error=True).output
        assert f"{out} is in use by host " in message and f", pid {holder.pid} (lock {out / '.lock'})" in message
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of a run written
        # the parts of an array job share OUT: each has its own lock, and part 2 runs while part 1's is held
        with lock_held_elsewhere(out, ".lock.part-1-of-2"):
            invoke(*args, "--part", "2/2", "--shard-size-mb", "0.35")
            assert (out / "manifest.part-2-of-2.json").is_file()
            assert "is in use" in invoke(*args, "--part", "1/2", expect_error=True).output


def test_merge_refuses_parts_run_with_other_settings(tmp_path: Path, twelve_videos: Path) -> None:
    out = tmp_path / "parts"
    run_preprocess(small_shards_config(twelve_videos, out, part="1/2"), progress=False)
    run_preprocess(small_shards_config(twelve_videos, out, part="2/2", seed=1), progress=False)
    with pytest.raises(PreprocessError, match="part 2/2 differs from part 1/2 in seed, videos"):
        merge_parts(out)
    assert not (out / "manifest.json").exists()


# --- the benchmark ---------------------------------------------------------------------------------------------


def test_bench_preprocess_prints_rates_ratio_and_bytes_per_frame(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (row,) = bench_preprocess(tmp_path, workers=2, classes=2, videos_per_class=2, formats=("jpeg",), repeats=1)
    assert (row.videos, row.frames) == (4, 4 * 125)
    assert row.videos_per_second > 0 and row.plain_videos_per_second > 0 and row.cpu_ratio > 0
    assert 1_000 < row.bytes_per_frame < 100_000
    table = capsys.readouterr().out
    assert "plain ffmpeg videos/s" in table and table.splitlines()[-1].split()[0] == "jpeg"
