"""Damaged shards: checksums written and checked, `preprocess verify`, and a strip DALI cannot decode named and
skipped by the loader, training, evaluation and the benchmark, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from clickit import invoke
from clipdata import damage_strip, noise_frames, write_dataset
from nvidia.dali.pipeline import OperatorConcurrency

from dali_skd.commands.bench import BenchConfig, run_bench
from dali_skd.config import AugmentConfig, ClipConfig, LoaderConfig, SamplingConfig, TrainConfig
from dali_skd.data import loader as loader_module
from dali_skd.data.loader import EvalLoader, TrainLoader, dali_threads, executor_threads_needed
from dali_skd.data.pipeline import DecoderOptions
from dali_skd.data.source import RECORDS, VIDEOS_PER_SPLIT
from dali_skd.distributed import init_distributed
from dali_skd.evaluation import evaluate
from dali_skd.format import SampleMeta, ShardManifest
from dali_skd.runtime import Runtime
from dali_skd.training import Trainer, train

TESTS = Path(__file__).resolve().parent
GREY = 0.2  # a frame's standard deviation in [-1, 1] units: noise videos have about 0.4, a grey decode much less


def grey_frames(clips: torch.Tensor) -> torch.Tensor:
    """How many frames of each N x 3 x T x H x W clip are (nearly) flat grey."""
    return (clips.float().transpose(1, 2).flatten(2).std(dim=2) < GREY).sum(dim=1)


def make_data(root: Path, checksums: bool = True, videos: int = 8, frames_per_jpeg: int = 4) -> Path:
    """Noise videos of 16 frames (4 strips), told apart by their tint, the same in train and test, 3 a shard."""
    clips = [(noise_frames(16, seed=i, tint=i % 2), i % 2) for i in range(videos)]
    splits = {"train": clips, "test": clips}
    return write_dataset(root, splits, ["a", "b"], frames_per_jpeg=frames_per_jpeg, per_shard=3, checksums=checksums)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def unchecked(tmp_path_factory) -> Path:
    """Shards as written before checksums."""
    return make_data(tmp_path_factory.mktemp("unchecked"), checksums=False)


def copy(data: Path, to: Path) -> Path:
    shutil.copytree(data, to)
    return to


CLIP = ClipConfig(length=8, crop=32)
CPU = torch.device("cpu")


def eval_loader(data: Path | str, split: str = "test", **kw) -> EvalLoader:
    """An EvalLoader of 8-frame clips cropped to 32 on the CPU; `kw`: the loader's settings, and the EvalLoader's."""
    loader = LoaderConfig(**{"threads": 2, **{k: kw.pop(k) for k in list(kw) if hasattr(LoaderConfig, k)}})
    return EvalLoader(str(data), split, clip=CLIP, loader=loader, runtime=kw.pop("runtime", Runtime(CPU)), **kw)


def train_loader(data: Path | str, clip: ClipConfig = CLIP, threads: int = 2, **kw) -> TrainLoader:
    sampling = SamplingConfig(shuffle_buffer=2)
    runtime = kw.pop("runtime", Runtime(CPU))
    return TrainLoader(
        str(data), clip=clip, loader=LoaderConfig(threads=threads), sampling=sampling, runtime=runtime, **kw
    )


def eval_clips(data: Path | str, batch_size: int = 5, **kw) -> tuple[EvalLoader, list[int], torch.Tensor]:
    loader = eval_loader(data, "test", batch_size=batch_size, clips_per_video=2, **kw)
    batches = list(loader.epoch())
    ids = [vid % VIDEOS_PER_SPLIT for vid in torch.cat([b.video_ids for b in batches]).tolist()]  # index in test
    return loader, ids, torch.cat([b.clips for b in batches])


# -- what preprocess records, and what reads it --------------------------------------------------------------------


def test_shards_and_manifests_without_checksums_still_load(unchecked: Path) -> None:
    raw = json.loads((unchecked / "manifest.json").read_text())
    assert all("crc32" not in s or s["crc32"] is None for split in raw["splits"].values() for s in split["shards"])
    for split in raw["splits"].values():  # a manifest from before: no crc32 key at all
        for shard in split["shards"]:
            shard.pop("crc32", None)
    assert ShardManifest.from_dict(raw).splits["train"].shards[0].crc32 is None
    old = {"label": 1, "label_name": "b", "source": "x.avi", "frames": 9, "fps": 25.0, "width": 64, "height": 48,
           "format": "jpeg", "frames_per_jpeg": 8, "strip_offsets": [0, 10, 20]}  # fmt: skip
    meta = SampleMeta.from_json(json.dumps(old).encode(), "x")
    assert meta.strip_crc32 == () and meta.media_crc32 is None
    _, ids, _ = eval_clips(unchecked)
    assert sorted(set(ids)) == list(range(8))


def test_a_damaged_strip_is_skipped_named_and_never_decoded(clean: Path, unchecked: Path, tmp_path: Path) -> None:
    """Garbled entropy-coded data passes every header check and decodes to grey: only its checksum gives it away."""
    for name, data in (("checked", clean), ("unchecked", unchecked)):
        damaged = copy(data, tmp_path / name)
        damage_strip(damaged, "test", "test-0000004", "garble", strip=1)
        damage_strip(damaged, "train", "train-0000004", "garble", strip=2)
        loader, ids, clips = eval_clips(damaged)
        grey = grey_frames(clips)
        if name == "unchecked":  # what the checksum prevents: the grey clip is scored
            assert grey.any() and 4 in ids
            continue
        assert not grey.any() and sorted(set(ids)) == [0, 1, 2, 3, 5, 6, 7]
        assert loader.stats.skipped == 1
        assert "test-0000004: strip 1: checksum mismatch" in loader.stats.examples[0]
        training = train_loader(damaged, batch_size=3, num_views=2)  # unaugmented: grey would show
        for epoch in range(3):
            for batch in training.epoch(epoch):
                assert len(batch.labels) == 3
                assert not any(grey_frames(v).any() for v in batch.views)
        assert training.stats.unusable == 1 and "train-0000004" in training.stats.examples[0]
        assert training.pipeline_builds == 1


def test_old_shards_are_still_checked_by_their_headers(unchecked: Path, tmp_path: Path) -> None:
    damaged = copy(unchecked, tmp_path / "d")
    tar = damaged / "test" / "shard-000000.tar"
    raw = bytearray(tar.read_bytes())
    first = raw.find(b"\xff\xd8\xff")
    raw[first : first + 64] = bytes(64)  # not a JPEG any more
    tar.write_bytes(bytes(raw))
    loader, ids, _ = eval_clips(damaged)
    assert 0 not in ids and "test-0000000: strip 0: not a JPEG" in loader.stats.examples[0]


# -- a strip DALI cannot decode ------------------------------------------------------------------------------------


def test_a_bogus_huffman_table_is_named_and_skipped(clean: Path, unchecked: Path, tmp_path: Path, capsys) -> None:
    """Fatal to DALI's CPU decoder (the header check passes): without a checksum the loader maps "Failed to decode
    sample #k" back to the video, rebuilds the pipeline once and goes on; with one, DALI never sees the strip. The
    skipped sample and the rebuilt pipeline are each said once, at the default log level."""
    _, all_ids, all_clips = eval_clips(unchecked)
    kept = [i for i, vid in enumerate(all_ids) if vid != 4]
    for name, data in (("unchecked", unchecked), ("checked", clean)):
        damaged = copy(data, tmp_path / name)
        damage_strip(damaged, "test", "test-0000004", "huffman")
        capsys.readouterr()
        loader, ids, clips = eval_clips(damaged)
        logged = capsys.readouterr().err.splitlines()
        assert [line.endswith("; skipped") for line in logged if "test-0000004" in line] == [True]
        rebuilt = [line for line in logged if "rebuilt the DALI pipeline" in line]
        assert ids == [all_ids[i] for i in kept] and torch.equal(clips, all_clips[kept])  # the others, once each
        assert loader.stats.skipped == 1 and "test-0000004" in loader.stats.examples[0]
        if name == "unchecked":
            assert "DALI could not decode it" in loader.stats.examples[0] and loader.pipeline_builds == 2
            (line,) = rebuilt
            assert line.startswith(f"{damaged}, split test: rebuilt the DALI pipeline in ")
            assert line.endswith(
                " s (the last one failed to decode a sample, and DALI does not run a failed pipeline again)"
            )
            assert list(loader.undecodable) == [f"{damaged}/test/shard-000001.tar: test-0000004"]
            again = [vid % VIDEOS_PER_SPLIT for batch in loader.epoch() for vid in batch.video_ids.tolist()]
            assert again == ids and loader.pipeline_builds == 2 and loader.stats.skipped == 2  # skipped, not decoded
        else:
            assert "checksum mismatch" in loader.stats.examples[0] and loader.pipeline_builds == 1 and not rebuilt


@pytest.mark.parametrize("prefetch", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_the_failed_sample_is_mapped_to_its_row_and_nothing_else_is_lost(
    unchecked: Path, tmp_path_factory, prefetch: int, batch_size: int
) -> None:
    """Whatever batch and row the undecodable video lands in, and however many batches are in flight: it alone is
    left out, every other clip comes exactly once, in order. (Its first clip, decoded before its second failed in
    the next batch, may have come out: evaluation drops the video, the test below.)"""
    damaged = tmp_path_factory.mktemp("huffman") / "d"
    if not damaged.exists():
        copy(unchecked, damaged)
        damage_strip(damaged, "test", "test-0000002", "huffman", strip=3)
    _, clean_ids, clean_clips = eval_clips(unchecked, batch_size=batch_size, prefetch=prefetch)
    loader, ids, clips = eval_clips(damaged, batch_size=batch_size, prefetch=prefetch)
    kept = [i for i, vid in enumerate(ids) if vid != 2]
    clean_kept = [i for i, vid in enumerate(clean_ids) if vid != 2]
    assert [ids[i] for i in kept] == [clean_ids[i] for i in clean_kept]
    assert torch.equal(clips[kept], clean_clips[clean_kept])
    assert ids.count(2) <= 1 and loader.undecodable_ids() == {VIDEOS_PER_SPLIT + 2} and loader.pipeline_builds == 2


def test_the_failed_pipeline_is_released_before_the_next_is_built(unchecked: Path, tmp_path: Path, monkeypatch) -> None:
    """Nothing holds a pipeline that failed once the loader drops it: its decoders (thread pools and, on a GPU,
    preallocated buffers) never live beside the next pipeline's, however many rebuilds a run needs."""
    damaged = copy(unchecked, tmp_path / "d")
    for key in ("test-0000001", "test-0000005"):
        damage_strip(damaged, "test", key, "huffman")
    built: list[weakref.ref] = []
    alive_at_build: list[int] = []
    build = loader_module.clip_pipeline

    def clip_pipeline(**kw):
        alive_at_build.append(sum(ref() is not None for ref in built))
        pipe = build(**kw)
        built.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr("dali_skd.data.loader.clip_pipeline", clip_pipeline)
    loader, ids, _ = eval_clips(damaged)
    assert sorted(set(ids)) == [0, 2, 3, 4, 6, 7] and loader.pipeline_builds == 3
    assert alive_at_build == [0, 0, 0]


def test_evaluation_drops_a_video_whose_later_clip_fails(unchecked: Path, tmp_path: Path) -> None:
    damaged = copy(unchecked, tmp_path / "d")
    damage_strip(damaged, "test", "test-0000002", "huffman", strip=3)  # its second clip; its first is fine
    loader = eval_loader(damaged, "test", batch_size=5, clips_per_video=2)  # video 2's clips: batches 1 and 2
    two_logits = torch.nn.Sequential(torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    result = evaluate(two_logits, loader, init_distributed("cpu"), "fp32")
    assert (result.videos, result.clips, result.skipped) == (7, 14, 1)


def fail_on_second_run(monkeypatch, pipe, message: str) -> None:
    """`pipe.run` raises `message` the second time it is called (a batch has been fed and not yet output)."""
    real, calls = pipe.run, []

    def run(*args):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError(message)
        return real(*args)

    monkeypatch.setattr(pipe, "run", run)


def test_an_injected_decoder_error_names_the_key_and_the_run_goes_on(clean: Path, monkeypatch) -> None:
    """The GPU's mixed decoder fails the same way ("Failed to decode sample #k"): injected here into a CPU run."""
    loader = train_loader(clean, batch_size=3, num_views=2, augment=AugmentConfig())
    reference = list(train_loader(clean, batch_size=3, num_views=2, augment=AugmentConfig()).epoch(0))
    message = (
        "Critical error in pipeline:\nError in MIXED operator `decoders.image_slice`\nFailed to decode sample #1 : "
    )
    fail_on_second_run(monkeypatch, loader._pipeline(), message)
    batches = list(loader.epoch(0))
    assert [len(b.labels) for b in batches] == [3, 2]  # the second batch without its second video
    assert torch.equal(batches[1].labels, reference[1].labels[[0, 2]])
    assert torch.equal(batches[1].views[0], reference[1].views[0][[0, 2]])
    assert loader.pipeline_builds == 2 and loader.stats.unusable == 1
    (sample,) = loader.undecodable
    assert sample.startswith(str(clean / "train")) and "DALI could not decode it" in loader.stats.examples[0]

    # a failure DALI does not pin on a row: raised again, naming the batch's shards and what to run
    broken = eval_loader(clean, "test", batch_size=4, clips_per_video=1)
    fail_on_second_run(monkeypatch, broken._pipeline(), "Critical error in pipeline:\nError in CPU operator `crop`")
    with pytest.raises(
        RuntimeError, match=r"failed on a batch from .*shard-00000.\.tar .*Error in CPU operator.*verify"
    ):
        list(broken.epoch())


def test_a_failure_among_the_batches_drained_after_an_early_stop_is_no_error(clean: Path, monkeypatch) -> None:
    loader = train_loader(clean, batch_size=3, num_views=2, augment=AugmentConfig())
    fail_on_second_run(monkeypatch, loader._pipeline(), "Failed to decode sample #0 : ")
    stream = loader.stream(0)
    next(stream)
    stream.close()  # draining what the pipeline prefetched meets the failure: the next epoch builds afresh
    assert len(list(loader.epoch(1))) == loader.steps_per_epoch and loader.pipeline_builds == 2


def test_max_bad_samples_stops_the_run_naming_them(unchecked: Path, tmp_path: Path) -> None:
    damaged = copy(unchecked, tmp_path / "d")
    for key in ("test-0000001", "test-0000005"):
        damage_strip(damaged, "test", key, "huffman")
    with pytest.raises(
        RuntimeError, match=r"2 samples of test .* more than --loader.max-bad-samples 1 .*test-0000001.*verify"
    ):
        eval_clips(damaged, max_bad_samples=1)
    assert len(eval_clips(damaged, max_bad_samples=2)[1]) == 2 * 6


@pytest.mark.slow
def test_training_skips_an_undecodable_sample_and_resumes_skipping_it(unchecked: Path, tmp_path: Path) -> None:
    """Trains to the end, counts the samples, keeps them in the checkpoint; a resumed run skips them from the start
    (no decoder failure, no rebuilt pipeline) and ends with the weights of the uninterrupted run."""
    damaged = copy(unchecked, tmp_path / "d")
    for strip in (1, 2):  # every 8-frame clip of the video touches one of them
        damage_strip(damaged, "train", "train-0000006", "huffman", strip=strip)
    damage_strip(damaged, "test", "test-0000003", "huffman", strip=1)

    def config(out: str, epochs: int, resume: bool = False) -> TrainConfig:
        return TrainConfig(arch="r3d10-tiny", data=str(damaged), out=str(tmp_path / out), epochs=epochs,
                           batch_size=3, device="cpu", clip=CLIP, sampling=SamplingConfig(shuffle_buffer=2),
                           loader=LoaderConfig(threads=2), method="baseline", resume=resume)  # fmt: skip

    straight = train(config("straight", 2))
    assert (straight.skipped, straight.val_skipped) == (1, 1)
    assert "damaged or unreadable, skipped: 1 training sample and 1 validation video" in straight.format()
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["skipped"], line["val_skipped"]) for line in lines] == [(1, 1), (1, 1)]  # once an epoch, each
    state = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert sorted(s.rsplit(": ", 1)[1] for s in state["bad_samples"]) == ["test-0000003", "train-0000006"]
    train(config("resumed", 1))
    trainer = Trainer.from_config(config("resumed", 2, resume=True), init_distributed("cpu"))
    trainer.run()
    assert trainer.train_loader.pipeline_builds == trainer.val_loader.pipeline_builds == 1
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for key, value in state["method"].items():
        assert torch.equal(value, resumed["method"][key]), key


@pytest.mark.slow
def test_bench_names_and_skips_a_damaged_sample(clean: Path, tmp_path: Path, capsys) -> None:
    damaged = copy(clean, tmp_path / "d")
    damage_strip(damaged, "train", "train-0000002", "garble")
    report = run_bench(
        BenchConfig(
            data=str(damaged), device="cpu", loaders="host,dali", batch_size=4, seconds=1.0, repeats=1, clip=CLIP,
            sampling=SamplingConfig(shuffle_buffer=2), loader=LoaderConfig(threads=2),
        )
    )  # fmt: skip
    for name in ("host", "dali"):
        assert report["loaders"][name]["skipped"] >= 1
    host = report["loaders"]["host"]
    assert host["first_pass_check_s"] > 0 and host["every_read_cpu_us_per_sample"] > 0
    dali = report["loaders"]["dali"]
    assert dali["decoders"] == 2 * 3 and dali["pipeline_build_s"] > 0
    out = capsys.readouterr().out
    assert "damaged or unreadable samples skipped" in out and "strip checks" in out and "6 decoders" in out


# -- preprocess verify ---------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_in(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_verify_lists_every_damaged_member_and_exits_1(clean: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    damaged = copy(clean, tmp_path / "d")
    damage_strip(damaged, "test", "test-0000004", "garble", strip=1)
    damage_strip(damaged, "train", "train-0000001", "huffman", strip=3)
    shard = damaged / "train" / "shard-000002.tar"  # train-0000006, -0000007: a wrong label, and a tar header
    raw = bytearray(shard.read_bytes())
    cls = raw.find(b"train-0000007.cls")
    raw[cls + 512 : cls + 513] = b"0"  # its label, 1, now says 0
    raw[100:108] = b"0000600\0"  # the first member's mode: outside every member's data
    raw[148:156] = b" " * 8  # and its header's checksum made right again: a sound tar, changed outside the members
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    shard.write_bytes(bytes(raw))
    assert invoke("preprocess", "verify", str(clean), "--workers", "2").output.count("nothing damaged") == 1

    before = files_in(damaged)
    result = invoke("preprocess", "verify", str(damaged), "--workers", "2", expect_error=True)
    assert files_in(damaged) == before  # nothing written into the dataset: a read-only copy is verified alike
    assert result.exit_code == 1 and "3 problems: 3 damaged members of 3 samples, in 3 shards" in result.output
    assert f"listed in {tmp_path / 'damaged.jsonl'}" in result.output  # the current folder's, named
    lines = _lines(tmp_path / "damaged.jsonl")
    for line in lines:  # on screen too
        assert f"    {line['shard']}: {line['member']}: {line['problem']}\n" in result.output
    assert [(Path(x["shard"]).relative_to(damaged).as_posix(), x["key"], x["member"]) for x in lines] == [
        ("train/shard-000000.tar", "train-0000001", "train-0000001.jpgs"),
        ("train/shard-000002.tar", "train-0000007", "train-0000007.cls"),
        ("test/shard-000001.tar", "test-0000004", "test-0000004.jpgs"),
    ]
    assert lines[0]["problem"] == "strip 3: checksum mismatch (its bytes changed after preprocess wrote them)"
    assert lines[1]["problem"] == "says b'0', the .json label 1"

    # the label repaired, the header left: damage outside every member
    raw[cls + 512 : cls + 513] = b"1"
    shard.write_bytes(bytes(raw))
    result = invoke("preprocess", "verify", str(damaged), "--workers", "1", expect_error=True)
    assert "5 unchanged since the last verify" in result.output  # the shards not touched are not read again
    lines = _lines(tmp_path / "damaged.jsonl")
    header = [x for x in lines if x["key"] is None]
    assert len(lines) == 3 and len(header) == 1 and header[0]["shard"].endswith("train/shard-000002.tar")
    assert "outside every member" in header[0]["problem"]
    result = invoke("preprocess", "verify", str(clean), "--workers", "1")  # another dataset, the same report
    assert "nothing damaged" in result.output and "6 unchanged since the last verify" in result.output


def test_verify_and_the_loader_read_past_a_broken_tar_header(clean: Path, tmp_path: Path, monkeypatch) -> None:
    """A header whose checksum is wrong: its size cannot be trusted, so both look for the next sound header. The
    sample whose .jpgs it was is lost, the one before and the ones after are read; an epoch uses each of those
    once (none repeated to fill it) and counts the lost one once."""
    monkeypatch.chdir(tmp_path)
    damaged = copy(clean, tmp_path / "d")
    shard = damaged / "train" / "shard-000000.tar"  # train-0000000, -0000001, -0000002
    raw = bytearray(shard.read_bytes())
    at = raw.find(b"train-0000001.jpgs")
    raw[at + 148 : at + 156] = b"0000000\0"
    shard.write_bytes(bytes(raw))
    result = invoke("preprocess", "verify", str(damaged), "--workers", "1", expect_error=True)
    problems = [(Path(x["shard"]).name, x["member"], x["problem"]) for x in _lines(tmp_path / "damaged.jsonl")]
    assert problems == [
        ("shard-000000.tar", None, f"broken tar header at byte {at} (its checksum does not match): read on from the "
         f"next sound header, at byte {problems[0][2].rsplit(' ', 1)[1]}"),
        ("shard-000000.tar", "train-0000001.jpgs", "missing"),
    ]  # fmt: skip
    assert "unreadable after" not in result.output and "samples, the manifest says" not in result.output

    loader = train_loader(damaged, batch_size=1)
    keys = [r.key for batch in loader.host_batches(0, loader.steps_per_epoch) for r in batch[RECORDS]]
    assert sorted(keys) == [f"train-{i:07d}" for i in range(8) if i != 1]
    assert loader.stats.skipped == loader.stats.unusable == 1 and loader.steps_per_epoch == 8
    assert len(list(loader.epoch(1))) == 7  # the pipeline's epoch ends with the pass


def test_verify_old_shards_by_decoding_and_remote_ones_by_streaming(
    unchecked: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    damaged = copy(unchecked, tmp_path / "d")
    damage_strip(damaged, "test", "test-0000004", "huffman", strip=1)
    result = invoke("preprocess", "verify", str(damaged), expect_error=True)
    assert "written before checksums" in result.output and "full Pillow decode" in result.output
    local = _lines(tmp_path / "damaged.jsonl")
    assert [(x["key"], x["member"]) for x in local] == [("test-0000004", "test-0000004.jpgs")]
    assert local[0]["problem"].startswith("strip 1: does not decode")

    for _ in range(2):  # a remote shard is read again every time
        result = invoke("preprocess", "verify", f"pipe:cat {damaged}/{{}}", "--workers", "2", expect_error=True)
        assert "unchanged since" not in result.output
    remote = _lines(tmp_path / "damaged.jsonl")
    assert [{**x, "shard": x["shard"].removeprefix("pipe:cat ")} for x in remote] == local


# -- decoders share the machine; no copy that is not needed -------------------------------------------------------


@pytest.mark.parametrize("frames_per_jpeg", [4, 8, 16])
def test_one_decoder_per_view_and_slot_each_given_the_cores_in_its_turn(tmp_path: Path, frames_per_jpeg: int) -> None:
    """DALI's default executor runs the mixed decoders one at a time (concurrency backend): each one's pool gets the
    process's whole share of the cores; only side by side (concurrency full) do they split it."""
    data = make_data(tmp_path / "d", videos=2, frames_per_jpeg=frames_per_jpeg)
    loader = train_loader(data, ClipConfig(crop=32), threads=0, batch_size=2, num_views=2, augment=AugmentConfig())
    pipe = loader._pipeline()
    assert pipe.serialize().count(b"decoders__ImageSlice") == loader.decoders == {4: 10, 8: 6, 16: 4}[frames_per_jpeg]
    assert pipe.concurrency == OperatorConcurrency.BACKEND and pipe.num_threads == loader.num_threads
    cores = len(os.sched_getaffinity(0))
    assert dali_threads(0, loader.decoders) == min(16, cores) == loader.num_threads
    assert dali_threads(0, loader.decoders, "full") == max(1, cores // loader.decoders)
    assert dali_threads(3, loader.decoders, "full") == dali_threads(3, loader.decoders) == 3  # as asked
    assert DecoderOptions().arguments(gpu=True)["affine"] is False and "affine" not in DecoderOptions().arguments(False)


def test_concurrency_full_runs_the_same_clips(clean: Path) -> None:
    """--loader.concurrency full (for the GPU's decoders side by side) changes how DALI schedules, not a clip."""
    batches = {}
    for concurrency in ("backend", "full"):
        loader = TrainLoader(
            str(clean), clip=CLIP, loader=LoaderConfig(threads=2, concurrency=concurrency), runtime=Runtime(CPU),
            sampling=SamplingConfig(shuffle_buffer=2), batch_size=3, num_views=2, augment=AugmentConfig(),
        )  # fmt: skip
        assert loader._pipeline().concurrency == {"backend": OperatorConcurrency.BACKEND,
                                                  "full": OperatorConcurrency.FULL}[concurrency]  # fmt: skip
        batches[concurrency] = list(loader.epoch(0))
    for a, b in zip(batches["backend"], batches["full"], strict=True):
        assert torch.equal(a.labels, b.labels) and all(map(torch.equal, a.views, b.views))


def test_full_concurrency_asks_dali_for_enough_executor_threads(monkeypatch, caplog) -> None:
    """DALI 2.4 runs at most min(num_threads, 4) operators at once unless DALI_EXEC2_NUM_THREADS says otherwise."""
    monkeypatch.delenv("DALI_EXEC2_NUM_THREADS", raising=False)
    loader_module._ask_executor_threads(13)
    assert os.environ["DALI_EXEC2_NUM_THREADS"] == "13"
    assert executor_threads_needed(10, 2) == 13  # fpj 4: ten decoders, two views' GPU operators, the CPU's
    monkeypatch.setenv("DALI_EXEC2_NUM_THREADS", "4")
    loader_module._ask_executor_threads(9)
    assert os.environ["DALI_EXEC2_NUM_THREADS"] == "4"
    assert "DALI_EXEC2_NUM_THREADS=4: with --loader.concurrency full, up to 9" in caplog.text


def test_channels_last_clips_equal_todays_value_for_value(clean: Path) -> None:
    """FHWC from DALI, permuted: the N x C x T x H x W tensors of the CFHW pipeline, in channels_last_3d memory."""
    for channels_last in (False, True):
        runtime = Runtime(CPU, channels_last=channels_last)
        loader = train_loader(clean, batch_size=3, num_views=2, augment=AugmentConfig(), runtime=runtime)
        batches = list(loader.epoch(1))
        if not channels_last:
            reference = batches
            continue
        for a, b in zip(reference, batches, strict=True):
            assert torch.equal(a.labels, b.labels)
            for u, v in zip(a.views, b.views, strict=True):
                assert v.shape == u.shape and torch.equal(u, v)
                assert v.is_contiguous(memory_format=torch.channels_last_3d) and not u.is_contiguous(
                    memory_format=torch.channels_last_3d
                )
                assert v.to(memory_format=torch.channels_last_3d).data_ptr() == v.data_ptr()  # step.py: no copy
    evaluation = eval_loader(clean, "test", batch_size=4, clips_per_video=2, runtime=Runtime(CPU, channels_last=True))
    clips = torch.cat([b.clips for b in evaluation.epoch()])
    assert torch.equal(clips, eval_clips(clean, batch_size=4)[2])


@pytest.mark.slow
def test_no_test_imports_an_ffmpeg_helper_when_collected() -> None:
    """The GPU machine has no imageio-ffmpeg and no ffmpeg: its tests must still be collected there."""
    code = (
        "import sys; sys.modules['imageio_ffmpeg'] = None; import pytest; "
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_gpu.py" in done.stdout


def test_verify_summary_counts_one_of_each_in_the_singular(tmp_path: Path) -> None:
    from preprocess.verify import ShardCheck, VerifySummary

    line = {"shard": "train/shard-000000.tar", "key": "train-0000001", "member": "train-0000001.jpgs", "problem": "x"}
    one = ShardCheck("train/shard-000000.tar", samples=1, strips=1, decoded=True, damaged=[line])
    text = VerifySummary("data", tmp_path / "damaged.jsonl", [one], 0.1).format()
    assert "verified 1 shard (1 sample) of data" in text and "(1 strip or video checked)" in text
    assert "1 shard was written before checksums" in text
    assert "1 problem: 1 damaged member of 1 sample, in 1 shard," in text
