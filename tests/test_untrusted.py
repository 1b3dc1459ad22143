"""A dataset is input from strangers: hostile manifests, shard paths, sample metadata and tar headers end in a
one-line error or a skip that names the field or the shard; no command runs and no read leaves the dataset."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import torch
from clickit import invoke
from clipdata import noise_frames, write_dataset
from conftest import write_checkpoint

from dali_skd.config import ClipConfig, LoaderConfig, PreprocessConfig, SamplingConfig, TrainConfig
from dali_skd.data.loader import EvalLoader, TrainLoader
from dali_skd.data.shards import Lost, join_location, sample_frames, shard_records
from dali_skd.format import FormatError, SampleMeta, ShardInfo, ShardManifest, SplitInfo, manifest_schema
from dali_skd.runtime import Runtime
from preprocess import verify
from preprocess.run import run_preprocess

REPO = Path(__file__).resolve().parents[1]

TINY = ("--arch", "r3d10-tiny", "--epochs", "1", "--batch-size", "4", "--clip.length", "8", "--clip.crop", "32")
TINY += ("--sampling.shuffle-buffer", "2", "--loader.threads", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two classes, 8 training videos in 4 shards and 4 test videos in 2: keys train-0000000.. and test-0000000.."""
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(12)]
    root = tmp_path_factory.mktemp("dataset")
    return write_dataset(root, {"train": videos[:8], "test": videos[8:]}, ["a", "b"], per_shard=2)


def edited(dataset: Path, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the dataset whose manifest `edit` changed in place (a list it returns replaces the whole of it)."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    returned = edit(manifest)
    (data / "manifest.json").write_text(json.dumps(returned if isinstance(returned, list) else manifest))
    return data


CLIP = ClipConfig(length=8, crop=32)


def train_loader(data: Path, **kw) -> TrainLoader:
    return TrainLoader(
        str(data), clip=CLIP, loader=LoaderConfig(threads=1), sampling=SamplingConfig(shuffle_buffer=2),
        runtime=Runtime(torch.device("cpu")), **kw,
    )  # fmt: skip


def one_line_error(output: str) -> str:
    """The CLI's output is one line, `Error: ...`, and no traceback."""
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def first_shard(m: dict) -> dict:
    return m["splits"]["train"]["shards"][0]


# -- the manifest's fields -------------------------------------------------------------------------------------

HOSTILE_MANIFESTS = {
    "a string for a count": (
        lambda m: first_shard(m).update(samples="8"),
        'splits.train.shards\\[0\\].samples is "8"; expected a count ≥ 0',
    ),
    "a list for splits": (lambda m: m.update(splits=[1]), "splits is a list of 1; expected an object"),
    "a list at the top level": (lambda m: [m], "manifest.json is a list of 1; expected an object"),
    "frames_per_jpeg 0": (lambda m: m.update(frames_per_jpeg=0), "frames_per_jpeg is 0; expected a count ≥ 1"),
    "classes a string": (lambda m: m.update(classes="up_slow"), 'classes is "up_slow"; expected a list of class'),
    "classes repeated": (lambda m: m.update(classes=["a", "a"]), 'classes\\[1\\] is "a"; expected a name not given'),
    "a class name empty": (lambda m: m.update(classes=["a", ""]), 'classes\\[1\\] is ""; expected a non-empty'),
    "no class": (lambda m: m.update(classes=[]), "classes is a list of 0; expected a list of class names"),
    "a negative count": (
        lambda m: first_shard(m).update(samples=-5),
        "splits.train.shards\\[0\\].samples is -5; expected a count ≥ 0",
    ),
    "a huge count": (
        lambda m: first_shard(m).update(samples=1e12),
        "splits.train.shards\\[0\\].samples is 1000000000000.0; expected a count ≥ 0",
    ),
    "a huge whole count": (
        lambda m: m["splits"]["train"].update(samples=10**12),
        "splits.train.samples is 1000000000000; expected at most 1,000,000,000",
    ),
    "more samples than the shard's bytes hold": (
        lambda m: first_shard(m).update(samples=1000) or m["splits"]["train"].update(samples=1006),
        "splits.train.shards\\[0\\].samples is 1000; expected at most 20 in 61440 bytes",
    ),
    "a split's count unlike its shards'": (
        lambda m: m["splits"]["train"].update(samples=9),
        "splits.train.samples is 9; expected 8, the samples of the shards it lists",
    ),
    "a split without its shards": (
        lambda m: m["splits"]["train"].__delitem__("shards"),
        "splits.train.shards lists no shard; expected the shards of its 8 samples",
    ),
    "a shard listed twice": (
        lambda m: m["splits"]["test"]["shards"][0].update(path=first_shard(m)["path"]),
        "splits.test.shards\\[0\\].path is .*; expected a shard of its own, not splits.train.shards\\[0\\]'s",
    ),
    "an unknown format": (lambda m: m.update(format="h264"), 'format is "h264"; expected "jpeg" or "vp9"'),
    "a required field missing": (lambda m: m.__delitem__("short_side"), "short_side is missing; expected a value"),
    "a split name with a slash": (
        lambda m: m["splits"].update({"../x": m["splits"].pop("test")}),
        'splits has "../x"; expected names of letters',
    ),
    "a boolean for a count": (lambda m: m.update(quality=True), "quality is true; expected a whole number"),
    "NaN frames per second": (lambda m: m.update(fps=float("nan")), "fps is NaN; expected a number > 0"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_hostile_manifest_fields_are_one_line_errors(dataset: Path, tmp_path: Path, case: str) -> None:
    edit, message = HOSTILE_MANIFESTS[case]
    data = edited(dataset, tmp_path, edit)
    line = one_line_error(
        invoke("train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, expect_error=True).output
    )
    assert str(data / "manifest.json") in line
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_schema_covers_every_field_and_unknown_ones_are_ignored(dataset: Path, tmp_path: Path, caplog) -> None:
    schema = manifest_schema()
    for cls in (ShardManifest, SplitInfo, ShardInfo):
        declared = schema if cls is ShardManifest else schema["$defs"][cls.__name__]
        assert set(declared["properties"]) == {f.name for f in fields(cls)}, cls
    data = edited(dataset, tmp_path, lambda m: m.update(made_by="a newer dali-skd"))
    with caplog.at_level(logging.WARNING):
        manifest = ShardManifest.load(data)
    assert manifest.num_classes == 2 and "field 'made_by' is unknown to this dali-skd" in caplog.text


# -- the manifest's JSON Schema, for other tools (docs/manifest.schema.json) --------------------------------------

# the faults no JSON Schema can say (sums, bytes per sample, a path listed twice): the loader alone refuses them
ONLY_THE_LOADER = {
    "more samples than the shard's bytes hold",
    "a split's count unlike its shards'",
    "a shard listed twice",
}


def test_the_published_schema_is_the_one_the_code_declares() -> None:
    published = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
    assert published == manifest_schema(), "run: python -m dali_skd.format > docs/manifest.schema.json"


@pytest.mark.slow
def test_the_schema_takes_the_built_in_set_and_refuses_the_hostile_manifests(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    run_preprocess(PreprocessConfig(dataset="synthetic", out=str(out), classes=2, videos_per_class=2, workers=2))
    schema = jsonschema.Draft202012Validator(json.loads((REPO / "docs" / "manifest.schema.json").read_text()))
    built = json.loads((out / "manifest.json").read_text())
    assert list(schema.iter_errors(built)) == []
    for case, (edit, _) in HOSTILE_MANIFESTS.items():
        manifest = json.loads(json.dumps(built))
        returned = edit(manifest)
        try:  # as a JSON tool reads it: NaN is not JSON
            text = json.dumps(returned if isinstance(returned, list) else manifest, allow_nan=False)
            refused = not schema.is_valid(json.loads(text))
        except ValueError:
            refused = True
        assert refused == (case not in ONLY_THE_LOADER), case


# -- no command from data, no read outside the dataset -----------------------------------------------------------

PAYLOAD = "x; touch {marker}; echo"


@pytest.mark.parametrize("template", ["pipe:cat {data}/{{}}", "pipe:cat {data}/{{}} | cat"])  # argv, then sh -c
def test_injected_shard_path_runs_no_command(dataset: Path, tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    data = edited(dataset, tmp_path, lambda m: first_shard(m).update(path=PAYLOAD.format(marker=marker)))
    location = template.format(data=data)
    line = one_line_error(
        invoke("train", "--data", location, "--out", str(tmp_path / "run"), *TINY, expect_error=True).output
    )
    assert "splits.train.shards[0].path is" in line and "expected a relative path" in line
    with pytest.raises(FormatError, match="is refused"):  # and the opener itself never pastes it
        join_location(location, PAYLOAD.format(marker=marker))
    assert not marker.exists()


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../../../../../../etc/passwd",
        "../outside/secret.tar",
        "http://elsewhere.example/x.tar",
        "-o/tmp/x",
    ],
)
def test_shard_paths_outside_the_dataset_are_refused(dataset: Path, tmp_path: Path, path: str) -> None:
    (tmp_path / "outside").mkdir()
    shutil.copy(dataset / "train" / "shard-000000.tar", tmp_path / "outside" / "secret.tar")
    data = edited(dataset, tmp_path, lambda m: first_shard(m).update(path=path))
    with pytest.raises(FormatError) as error:
        train_loader(data, batch_size=4)
    message = str(error.value)
    assert f'splits.train.shards[0].path is "{path}"; expected a relative path' in message
    assert "root:" not in message  # no byte of a file outside


def test_symlinks_out_of_the_dataset_are_refused_but_shards_the_user_names_are_read(
    dataset: Path, tmp_path: Path
) -> None:
    data = edited(dataset, tmp_path, lambda m: None)
    shard = data / "train" / "shard-000000.tar"
    shard.unlink()
    shard.symlink_to("/etc/passwd")
    with pytest.raises(
        FormatError, match=r"train/shard-000000\.tar resolves to /etc/passwd, outside the dataset folder"
    ):
        train_loader(data, batch_size=4)
    shutil.rmtree(data / "train")
    (data / "train").symlink_to(dataset / "train")  # a whole folder elsewhere
    with pytest.raises(FormatError, match=r"outside the dataset folder .*name them with --train-shards"):
        train_loader(data, batch_size=4)
    shards = f"{dataset}/train/shard-{{000000..000003}}.tar"  # typed by the user: theirs to point anywhere
    assert train_loader(data, shards=shards, batch_size=4).steps_per_epoch == 2


@pytest.mark.parametrize("target", ["/etc/passwd", "a sound tar"])
def test_verify_refuses_a_symlink_out_of_the_dataset_before_reading_anything(
    dataset: Path, tmp_path: Path, monkeypatch, target: str
) -> None:
    """By the loader's rule: /etc/passwd is not parsed as a tar, and a sound tar outside is not called sound."""
    outside = tmp_path / "outside.tar"
    shutil.copy(dataset / "train" / "shard-000000.tar", outside)
    data = edited(dataset, tmp_path, lambda m: None)
    shard = data / "test" / "shard-000001.tar"
    shard.unlink()
    shard.symlink_to("/etc/passwd" if target == "/etc/passwd" else outside)
    read = []
    monkeypatch.setattr(verify, "check_shard", lambda *args: read.append(args))
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("preprocess", "verify", str(data), expect_error=True).output)
    assert f"test/shard-000001.tar resolves to {Path(str(shard.readlink())).resolve()}, outside the dataset" in line
    assert read == [] and not (tmp_path / "damaged.jsonl").exists()


# -- samples --------------------------------------------------------------------------------------------------------

GOOD_SAMPLE = {
    "label": 1, "label_name": "b", "source": "b/v.avi", "frames": 12, "fps": 25.0, "width": 64, "height": 48,
    "format": "jpeg", "frames_per_jpeg": 8, "strip_offsets": [0, 100, 150],
}  # fmt: skip

HOSTILE_SAMPLES = {
    "frames a string": ({"frames": "12"}, 'frames is "12"; expected a count ≥ 1'),
    "a negative label": ({"label": -1}, "label is -1; expected a count ≥ 0"),
    "no width": ({"width": 0}, "width is 0; expected a whole number from 1 to 65,535"),
    "offsets going back": ({"strip_offsets": [0, 100, 50]}, "strip_offsets is a list of 3; expected byte offsets"),
    "too few offsets": ({"strip_offsets": [0, 100]}, "strip_offsets is a list of 2; expected 3 offsets"),
    "an unknown format": ({"format": "h264"}, 'format is "h264"; expected "jpeg" or "vp9"'),
    "no frames per strip": ({"frames_per_jpeg": 0}, "frames_per_jpeg is 0; expected a count ≥ 1 for format jpeg"),
    "a list, not an object": ([1], "x is a list of 1; expected an object"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAMPLES))
def test_sample_metadata_fields_are_checked(case: str) -> None:
    change, message = HOSTILE_SAMPLES[case]
    raw = change if isinstance(change, list) else {**GOOD_SAMPLE, **change}
    with pytest.raises(FormatError) as error:
        SampleMeta.from_json(json.dumps(raw).encode(), "x")
    assert str(error.value).startswith(message if case == "a list, not an object" else f"x: {message}"), error.value
    assert SampleMeta.from_json(json.dumps(GOOD_SAMPLE).encode(), "x").strip_offsets == (0, 100, 150)


def test_labels_outside_the_classes_are_skipped_and_named(dataset: Path, tmp_path: Path) -> None:
    data = edited(dataset, tmp_path, lambda m: m.update(classes=["a"]))  # label 1 is outside
    loader = train_loader(data, batch_size=2)
    labels = [label for batch in loader.epoch(0) for label in batch.labels.tolist()]
    assert labels and set(labels) == {0}
    assert loader.stats.skipped >= 1
    assert "train/shard-0000" in loader.stats.examples[0] and ": sample train-000000" in loader.stats.examples[0]
    assert "label 1 is not one of the manifest's classes (labels 0 to 0)" in loader.stats.examples[0]


def test_more_classes_than_labels_warn_after_the_first_epoch(dataset: Path, tmp_path: Path, caplog) -> None:
    data = edited(dataset, tmp_path, lambda m: m.update(classes=["a", "b", "c", "d"]))
    loader = train_loader(data, batch_size=4)
    with caplog.at_level(logging.WARNING):
        list(loader.epoch(0))
        assert "lists 4 classes, but the first epoch's samples (rank 0) used the labels of only 2" in caplog.text
        assert "never seen: c, d" in caplog.text
        caplog.clear()
        list(loader.epoch(1))
    assert "classes" not in caplog.text  # once


def test_epoch_length_comes_from_the_samples_found(dataset: Path, tmp_path: Path, caplog) -> None:
    def more(m: dict) -> None:  # 20 samples per shard: as many as their bytes could hold, so the schema passes
        for shard in m["splits"]["train"]["shards"]:
            shard["samples"] = 20
        m["splits"]["train"]["samples"] = 80

    with caplog.at_level(logging.WARNING):
        loader = train_loader(edited(dataset, tmp_path, more), batch_size=4)
    assert loader.steps_per_epoch == 2 and len(list(loader.epoch(0))) == 2
    assert "says split train holds 80 samples, but its shards hold 8: an epoch goes through the 8 found" in caplog.text


# -- bad bytes in a tar ---------------------------------------------------------------------------------------------


def _break_header(raw: bytearray, at: int, how: str) -> None:
    """Breaks the tar header at byte `at` as `how` says; the checksum is made right again unless it is the fault."""
    size = {"octal": b"zz\x01garbage\0\0", "negative": b"-0000000005\0", "beyond": b"%011o\0" % (10 * len(raw))}
    if how == "name":
        raw[at : at + 5] = b"\xff\xfe\xfd\xfc\xfb"
    elif how == "checksum":
        raw[at + 148 : at + 156] = b"0000000\0"
        return
    else:
        raw[at + 124 : at + 136] = size[how]
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("octal", r"broken tar header at byte \d+ \(its size field is not an octal number\): read on from the "
         r"next sound header, at byte \d+$"),
        ("negative", r"broken tar header at byte \d+ \(its size field is not an octal number\): read on from"),
        ("checksum", r"broken tar header at byte \d+ \(its checksum does not match\): read on from the next sound"),
        ("name", r"broken tar header at byte \d+ \(a member name that is not UTF-8\): its member skipped"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("member", ["cls", "jpgs"])
@pytest.mark.parametrize("where", ["local", "pipe"])
def test_a_broken_tar_header_costs_its_sample_not_the_rest_of_the_shard(
    dataset: Path, tmp_path: Path, how: str, reason: str, member: str, where: str
) -> None:
    """A header whose size cannot be trusted is passed over to the next sound header, 512 bytes at a time; one whose
    size can (its checksum matches) is passed over by its size. Either way the other sample of the shard is read,
    and the sample whose header broke is lost only if it needed that member (a loader does not read the .cls)."""
    tar = tmp_path / "shard.tar"
    raw = bytearray((dataset / "train" / "shard-000001.tar").read_bytes())  # train-0000002, train-0000003
    at = raw.find(f"train-0000002.{member}".encode())
    _break_header(raw, at, how)
    tar.write_bytes(bytes(raw))
    url = str(tar) if where == "local" else f"pipe:cat {tar}"
    items = list(shard_records(url, "jpgs"))
    records = [item.key for item in items if not isinstance(item, Lost)]
    lost = [(item.where, item.reason, item.samples) for item in items if isinstance(item, Lost)]
    assert lost[0][0] == f"{url}: byte {at}" and re.match(reason, lost[0][1]) and lost[0][2] == 0, lost
    if member == "cls":
        assert records == ["train-0000002", "train-0000003"] and len(lost) == 1
    else:
        assert records == ["train-0000003"] and lost[1:] == [(f"{url}: sample train-0000002", "no .jpgs member", 1)]
    assert sample_frames(str(tar)) == [12, 12]


@pytest.mark.parametrize("where", ["local", "pipe"])
def test_a_tar_header_giving_a_size_past_the_end_is_a_shard_cut_short(
    dataset: Path, tmp_path: Path, where: str
) -> None:
    tar = tmp_path / "shard.tar"
    raw = bytearray((dataset / "train" / "shard-000001.tar").read_bytes())
    _break_header(raw, raw.find(b"train-0000002.cls"), "beyond")
    tar.write_bytes(bytes(raw))
    url = str(tar) if where == "local" else f"pipe:cat {tar}"
    items = list(shard_records(url, "jpgs", expected=2))
    assert [(item.where, item.samples) for item in items] == [(f"{url}: sample train-0000002", 1), (url, 1)]
    assert re.fullmatch(
        "shard unreadable from here on: (sample train-0000002|member train-0000002.cls) is cut short \\(the shard "
        "was truncated\\)",
        items[1].reason,
    )


# -- checkpoints ----------------------------------------------------------------------------------------------------


class _RunsAShellCommand:
    def __reduce__(self) -> tuple:
        return os.system, ("touch pwned",)


def test_a_checkpoint_that_would_run_code_is_one_line_and_no_advice_to_load_it(
    dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    """A pickle that calls posix.system: `eval` and `--init` refuse it in one line naming the call, without torch's
    eight lines (their advice to load it with weights_only=False included), and nothing runs."""
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "best.pt"
    torch.save({"method": {}, "checkpoint_version": 2, "x": _RunsAShellCommand()}, evil)
    result = invoke("eval", "--data", str(dataset), "--checkpoint", str(evil), "--device", "cpu", expect_error=True)
    line = one_line_error(result.output)
    assert f"{evil} is not a readable dali-skd checkpoint (it holds a pickled call of posix.system" in line
    assert "weights_only=False" not in line and "likely succeed" not in line
    result = invoke("train", "--data", str(dataset), "--init", str(evil), "--out", str(tmp_path / "run"), *TINY,
                    expect_error=True)  # fmt: skip
    line = one_line_error(result.output)
    assert "--init: " in line and "pickled call of posix.system" in line and "weights_only=False" not in line
    assert not (tmp_path / "pwned").exists()


# -- video identity ---------------------------------------------------------------------------------------------------


def test_eval_shards_from_two_splits_are_distinct_videos(dataset: Path, tmp_path: Path) -> None:
    """train-0000000 and test-0000000 are two videos: 12 videos from 4 + 2 shards, and their keys in the
    predictions file."""
    write_checkpoint(tmp_path / "best.pt", TrainConfig(arch="r3d10-tiny", clip=CLIP))
    shards = f"{dataset}/train/shard-{{000000..000003}}.tar {dataset}/test/shard-{{000000..000001}}.tar"
    out = tmp_path / "eval.json"
    invoke(
        "eval", "--data", str(dataset), "--eval-shards", shards, "--checkpoint", str(tmp_path / "best.pt"),
        "--clips-per-video", "1", "--device", "cpu", "--loader.threads", "1", "--json", str(out),
    )  # fmt: skip
    assert json.loads(out.read_text())["videos"] == 12
    rows = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    keys = [f"train-{i:07d}" for i in range(8)] + [f"test-{i:07d}" for i in range(4)]
    assert [row["key"] for row in rows] == keys
    assert [row["source"] for row in rows] == [f"{key.split('-')[0]}/{int(key[-7:])}.avi" for key in keys]
    loader = EvalLoader(
        str(dataset), "test", clip=CLIP, loader=LoaderConfig(threads=1), shards=shards, batch_size=4, clips_per_video=1
    )
    assert len({vid for batch in loader.epoch() for vid in batch.video_ids.tolist()}) == 12
    assert os.path.exists(out.with_suffix(".confusion.png"))
