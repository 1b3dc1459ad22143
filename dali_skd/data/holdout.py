"""Validation apart from test: a part of the training split set aside to pick best.pt and drive the lr schedule on,
so that the test figure is not selected on the test videos.

Which videos: in each class, those whose keys come first in the order of their SHA-1 hashes, `fraction` of the
class (rounded, at least one, never all): deterministic (the same videos for every run, seed and process count of
one dataset), stratified by class, and independent of the shards' order. Finding them reads the training shards'
sample metadata once (tar headers and `.json` members; a streamed dataset is read through once for it).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from dali_skd.data.shards import VideoRecord, shard_records, split_urls
from dali_skd.errors import ConfigError
from dali_skd.format import ShardManifest


@dataclass(frozen=True)
class Subset:
    """Some videos of a split, by key: those of `keys` (`held`) or all but them; `samples` of them in all."""

    keys: frozenset[str]
    held: bool
    samples: int

    def __contains__(self, key: str) -> bool:
        return (key in self.keys) == self.held


@dataclass(frozen=True)
class Holdout:
    """The videos of the training split set aside for validation (`keys`), out of `split_samples`."""

    keys: frozenset[str]
    split_samples: int
    fraction: float

    @property
    def validation(self) -> Subset:
        return Subset(self.keys, True, len(self.keys))

    @property
    def training(self) -> Subset:
        return Subset(self.keys, False, self.split_samples - len(self.keys))

    def describe(self) -> str:
        return (
            f"validation on {len(self.keys)} of the {self.split_samples} training videos ({self.fraction:g} of each "
            "class, apart from test)"
        )


def held_out(keys_by_class: dict[int, list[str]], fraction: float) -> frozenset[str]:
    """`fraction` of each class's keys (rounded; at least one of a class of two or more, never a class's last one),
    those first in the order of their SHA-1 hashes."""
    held: set[str] = set()
    for keys in keys_by_class.values():
        count = min(len(keys) - 1, max(1, round(fraction * len(keys))))
        held.update(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).digest())[:count])
    return frozenset(held)


def training_holdout(
    data: str, manifest: ShardManifest, fraction: float, shards: str | None, read_timeout: float
) -> Holdout:
    """The validation part of `data`'s training split (its shards, or `shards`)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction is {fraction}; a validation part is more than 0 and less than 1 of a class")
    keys_by_class: dict[int, list[str]] = defaultdict(list)
    media_ext = "jpgs" if manifest.format == "jpeg" else "webm"
    for url in split_urls(data, manifest, "train", shards):
        for record in shard_records(url, media_ext, read_timeout):
            if isinstance(record, VideoRecord):  # what cannot be read is skipped here: the training loader names it
                keys_by_class[record.meta.label].append(record.key)
    held = held_out(keys_by_class, fraction)
    if not held:
        raise ConfigError(
            f"{data}: no class of the training split has two videos or more, so none can be set aside for "
            "validation: pass --val-fraction 0 (validate on the test split)"
        )
    return Holdout(held, sum(map(len, keys_by_class.values())), fraction)


def protocol(fraction: float) -> str:
    """Which videos pick best.pt, in words: every table and summary says it."""
    if fraction == 0:
        return "validation on the test split, the paper's protocol: best.pt, and so the test figure, picked on test"
    return f"validation on {fraction:g} of each class of the training split, held out: test not used to pick best.pt"
