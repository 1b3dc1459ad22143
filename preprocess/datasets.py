"""Dataset adapters: each lists a dataset's videos, classes and splits by its official file names and split files.

An adapter returns every video a split names, present or not: a missing file fails later, like a corrupt one,
and is listed in failed.jsonl with the reason "missing". Labels are 0-based indices into `classes`.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dali_skd.config import PreprocessConfig
from dali_skd.errors import InputError
from dali_skd.files import lock_directory


class PreprocessError(InputError):
    """A problem with the run's input or flags; the message names the file or folder and what to do next."""


@dataclass(frozen=True)
class Video:
    source: str  # path relative to the dataset root, POSIX (a missing Kinetics video: its expected name)
    label: int


@dataclass
class DatasetListing:
    classes: list[str]  # label order
    splits: dict[str, list[Video]]  # split name -> its videos, sorted by source
    split_number: int | None = None  # the official split used (UCF101, HMDB51)


def dataset_root(cfg: PreprocessConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    if cfg.dataset == "synthetic":
        return Path(cfg.out) / "videos"
    raise PreprocessError(f"--root is required for --dataset {cfg.dataset}: the folder that holds its videos")


def list_dataset(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """The videos of `cfg.dataset` under `root` (generating them first for `synthetic`)."""
    if cfg.dataset not in ADAPTERS:
        raise PreprocessError(f"unknown --dataset {cfg.dataset!r}: use one of {', '.join(ADAPTERS)}")
    if cfg.dataset != "synthetic" and not root.is_dir():
        raise PreprocessError(f"dataset root {root} is not a folder: pass --root with the folder of the videos")
    listing = ADAPTERS[cfg.dataset](cfg, root)
    for videos in listing.splits.values():
        videos.sort(key=lambda video: video.source)
    return listing


def list_ucf101(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """`ROOT/<Class>/v_<Class>_gXX_cYY.avi`; `ucfTrainTestlist/` holds classInd.txt (1-based, `1 ApplyEyeMakeup`),
    trainlist0N.txt (`ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1`) and testlist0N.txt (paths only)."""
    _check_split_number(cfg)
    splits_dir = _find_splits_dir(cfg, root, "ucfTrainTestlist", "classInd.txt")
    class_ind = splits_dir / "classInd.txt"
    numbered = {}
    for where, line in _lines(class_ind):
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise PreprocessError(f"{where}: expected '<number> <ClassName>', got {line!r}")
        numbered[int(fields[0])] = fields[1]
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise PreprocessError(f"{class_ind}: class numbers must run 1, 2, ... {len(numbered)} without gaps")
    classes = [numbered[number] for number in range(1, len(numbered) + 1)]
    label_of = {name: label for label, name in enumerate(classes)}
    splits = {}
    for split, file_name in (("train", f"trainlist0{cfg.split}.txt"), ("test", f"testlist0{cfg.split}.txt")):
        videos = []
        for where, line in _lines(_required(splits_dir / file_name, "the official UCF101 split list")):
            source = line.rsplit(maxsplit=1)[0] if split == "train" else line  # trainlist lines end in the label
            class_name = source.split("/", 1)[0]
            if class_name not in label_of:
                raise PreprocessError(f"{where}: class folder {class_name!r} is not in {class_ind}")
            videos.append(Video(source, label_of[class_name]))
        splits[split] = videos
    return DatasetListing(classes, splits, cfg.split)


def list_hmdb51(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """`ROOT/<class>/<video>.avi`; split files `<class>_test_split<N>.txt`, lines `<video>.avi <0|1|2>`
    (1 train, 2 test, 0 unused). Classes in sorted order of their names."""
    _check_split_number(cfg)
    suffix = f"_test_split{cfg.split}.txt"
    splits_dir = _find_splits_dir(cfg, root, "testTrainMulti_7030_splits", f"*{suffix}")
    split_files = sorted(splits_dir.glob(f"*{suffix}"))
    classes = [path.name.removesuffix(suffix) for path in split_files]
    splits: dict[str, list[Video]] = {"train": [], "test": []}
    for label, (class_name, split_file) in enumerate(zip(classes, split_files, strict=True)):
        for where, line in _lines(split_file):
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise PreprocessError(f"{where}: expected '<video>.avi <0|1|2>', got {line!r}")
            if fields[1] != "0":
                splits["train" if fields[1] == "1" else "test"].append(Video(f"{class_name}/{fields[0]}", label))
    return DatasetListing(classes, splits, cfg.split)


def list_kinetics400(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """Annotations `train.csv` and `validate.csv` (or `val.csv`), header `label,youtube_id,time_start,time_end,
    split[,is_cc]`; videos `<youtube_id>_<start:06d>_<end:06d>.<ext>` anywhere under ROOT. Classes: the sorted
    labels of train.csv. A video not found keeps its expected name (no extension) as its source."""
    splits_dir = _find_splits_dir(cfg, root, "annotations", "train.csv")
    val_csv = next((splits_dir / n for n in ("validate.csv", "val.csv") if (splits_dir / n).is_file()), None)
    if val_csv is None:
        raise PreprocessError(f"no validate.csv or val.csv beside {splits_dir / 'train.csv'}: add the validation csv")
    train_rows = _kinetics_rows(splits_dir / "train.csv")
    classes = sorted({label for label, _ in train_rows})
    label_of = {name: label for label, name in enumerate(classes)}
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".csv":
            found.setdefault(path.stem, path.relative_to(root).as_posix())
    splits = {}
    for split, rows, where in (
        ("train", train_rows, splits_dir / "train.csv"),
        ("val", _kinetics_rows(val_csv), val_csv),
    ):
        unknown = sorted({label for label, _ in rows} - label_of.keys())
        if unknown:
            raise PreprocessError(f"{where}: labels not in train.csv: {', '.join(unknown[:5])}; use the matching csvs")
        splits[split] = [Video(found.get(name, name), label_of[label]) for label, name in rows]
    return DatasetListing(classes, splits)


def _kinetics_rows(path: Path) -> list[tuple[str, str]]:
    """(label, video name without extension) per row."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        needed = {"label", "youtube_id", "time_start", "time_end"}
        if not needed <= set(reader.fieldnames or ()):
            raise PreprocessError(f"{path}: header must hold {', '.join(sorted(needed))}; it is {reader.fieldnames}")
        try:
            return [
                (
                    row["label"],
                    f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}",
                )
                for row in reader
            ]
        except (TypeError, ValueError) as e:
            raise PreprocessError(f"{path}, line {reader.line_num}: unreadable row ({e})") from e


def list_folder(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """`ROOT/<class>/<video>` (any depth below the class folder; every entry that is not a subfolder is a video, or
    fails with its reason: a FIFO, a broken link, a folder named like a video); a deterministic `val_fraction` of
    each class, chosen by a hash of the file's path, is the test split: adding videos never moves the others."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PreprocessError(f"{root} holds no class folders: --dataset folder reads ROOT/<class>/<video>")
    splits: dict[str, list[Video]] = {"train": [], "test": []}
    for label, class_name in enumerate(classes):
        sources = [
            path.relative_to(root).as_posix()
            for path in (root / class_name).rglob("*")
            if _may_be_a_video(path) and not any(part.startswith(".") for part in path.relative_to(root).parts)
        ]
        by_hash = sorted(sources, key=lambda source: hashlib.sha1(source.encode()).hexdigest())
        held_out = min(len(sources) - 1, max(1, round(len(sources) * cfg.val_fraction))) if cfg.val_fraction else 0
        for i, source in enumerate(by_hash):
            splits["test" if i < held_out else "train"].append(Video(source, label))
    return DatasetListing(classes, splits)


# a folder named so is listed (and fails, named in failed.jsonl), not taken for a subfolder of videos
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


def _may_be_a_video(path: Path) -> bool:
    """Every entry of a class folder is listed but the subfolders it holds videos in: a FIFO, a link that leads
    nowhere or to a folder, a folder named like a video are listed too, and fail with their reason (`transcode`)."""
    return path.is_symlink() or not path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def list_synthetic(cfg: PreprocessConfig, root: Path) -> DatasetListing:
    """Generate the built-in dataset into ROOT (the generator resumes an interrupted set and refuses one made
    with other parameters), then list `ROOT/{train,test}/<class>/*.mp4` with the labels of classes.txt."""
    from preprocess.synthetic import generate_synthetic  # numpy rendering, needed only here

    try:
        with lock_directory(root.parent, f"{root.name}.lock", wait=True):  # --part runs sharing ROOT make it once
            generate_synthetic(
                root, cfg.classes, cfg.videos_per_class, cfg.seed, cfg.workers, difficulty=cfg.difficulty
            )
    except (FileExistsError, ValueError) as e:  # another set in ROOT, or parameters it cannot make
        raise PreprocessError(str(e)) from e
    classes = [name.strip() for name in (root / "classes.txt").read_text(encoding="utf-8").splitlines() if name.strip()]
    label_of = {name: label for label, name in enumerate(classes)}
    splits: dict[str, list[Video]] = {}
    for split in ("train", "test"):
        splits[split] = []
        for path in sorted((root / split).glob("*/*.mp4")):
            if path.parent.name not in label_of:
                raise PreprocessError(f"{path.parent} is not a class of {root / 'classes.txt'}: regenerate {root}")
            splits[split].append(Video(path.relative_to(root).as_posix(), label_of[path.parent.name]))
    return DatasetListing(classes, splits)


ADAPTERS: dict[str, Callable[[PreprocessConfig, Path], DatasetListing]] = {
    "ucf101": list_ucf101,
    "hmdb51": list_hmdb51,
    "kinetics400": list_kinetics400,
    "folder": list_folder,
    "synthetic": list_synthetic,
}


def _check_split_number(cfg: PreprocessConfig) -> None:
    if cfg.split not in (1, 2, 3):
        raise PreprocessError(f"--split {cfg.split}: {cfg.dataset} has official splits 1, 2 and 3")


def _find_splits_dir(cfg: PreprocessConfig, root: Path, official_name: str, marker: str) -> Path:
    """--splits-dir, else the official folder inside or beside ROOT, else ROOT: the first holding `marker`."""
    if cfg.splits_dir is not None:
        candidates = [Path(cfg.splits_dir)]
    else:
        candidates = [root / official_name, root.parent / official_name, root]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob(marker)):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise PreprocessError(
        f"no {marker} in {looked}: pass --splits-dir with the folder of the official {cfg.dataset} split files "
        f"({official_name}/)"
    )


def _required(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PreprocessError(f"{path} is missing: it is {what}; pass --splits-dir with the folder that holds it")
    return path


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(`file, line N`, the line without surrounding white space) of each non-blank line (the official files
    end lines in CRLF)."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            yield f"{path}, line {number}", line.strip()
