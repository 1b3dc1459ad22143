"""Validation apart from test: a part of the training split set aside to pick best.pt and drive the lr schedule on,
so that the test figure is not selected on the test videos.

Which videos: in each class, those whose keys come first in the order of their SHA-1 hashes, `fraction` of the
class (rounded, at least one, never all): deterministic (the same videos for every run, seed and process count of
one dataset), stratified by class, and independent of the shards' order. Finding them reads the training shards'
sample metadata once (tar headers and `.json` members; a streamed dataset is read through once for it).

Where a video's file name says which group of clips it was cut with (`group_of`: UCF101's `v_<Class>_g08_c01`, the
clips of one long video, one actor and one setting; HMDB51's clips of one film and action), the group is held out
whole: drawn by the hash of its name, `fraction` of the class's groups. Drawn by video, the validation part would
hold clips whose group-mates are trained on, and reward a network that learnt the setting rather than the action
(docs/benchmarks.md measured it on the synthetic hard set, whose names carry no group).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping
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
    """The videos of the training split set aside for validation (`keys`), out of `split_samples`; `grouped` of the
    split's videos had a group in their names (held out whole with it)."""

    keys: frozenset[str]
    split_samples: int
    fraction: float
    grouped: int = 0

    @property
    def validation(self) -> Subset:
        return Subset(self.keys, True, len(self.keys))

    @property
    def training(self) -> Subset:
        return Subset(self.keys, False, self.split_samples - len(self.keys))

    def protocol(self) -> str:
        return protocol(self.fraction, by_group=self.grouped > 0)


# UCF101: v_<Class>_g<group>_c<clip>.<ext>; HMDB51: <film>_<action>_<body>_<camera>_np<n>_<view>_<quality>_<clip>.<ext>
_GROUPED_NAMES = (
    re.compile(r"^(?P<group>v_.+_g\d+)_c\d+\.\w+$"),
    re.compile(r"^(?P<group>.+)_[fhul]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+\.\w+$"),
)


def group_of(source: str) -> str | None:
    """The group of clips a video was cut with, where its file name (`source`, a path in the dataset) says it:
    UCF101's `v_ApplyEyeMakeup_g08_c01.avi` -> `v_ApplyEyeMakeup_g08`, HMDB51's
    `April_09_brush_hair_u_nm_np1_ba_goo_0.avi` -> `April_09_brush_hair`; None for any other name."""
    name = source.rsplit("/", 1)[-1]
    for pattern in _GROUPED_NAMES:
        if match := pattern.match(name):
            return match["group"]
    return None


def held_out(
    keys_by_class: Mapping[int, list[str]], fraction: float, groups: Mapping[str, str] | None = None
) -> frozenset[str]:
    """`fraction` of each class's keys (rounded; at least one of a class of two or more, never a class's last one),
    those first in the order of their SHA-1 hashes. Keys with a group in `groups` go together: `fraction` of the
    class's groups (a video without one is a group of its own), drawn by the hashes of the groups' names."""
    groups = groups or {}
    held: set[str] = set()
    for keys in keys_by_class.values():
        members: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            members[groups.get(key, key)].append(key)
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        for name in sorted(members, key=lambda g: hashlib.sha1(g.encode()).digest())[:count]:
            held.update(members[name])
    return frozenset(held)


def training_holdout(
    data: str, manifest: ShardManifest, fraction: float, shards: str | None, read_timeout: float
) -> Holdout:
    """The validation part of `data`'s training split (its shards, or `shards`)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction is {fraction}; a validation part is more than 0 and less than 1 of a class")
    keys_by_class: dict[int, list[str]] = defaultdict(list)
    groups: dict[str, str] = {}
    media_ext = "jpgs" if manifest.format == "jpeg" else "webm"
    for url in split_urls(data, manifest, "train", shards):
        for record in shard_records(url, media_ext, read_timeout):
            if isinstance(record, VideoRecord):  # what cannot be read is skipped here: the training loader names it
                keys_by_class[record.meta.label].append(record.key)
                if (group := group_of(record.meta.source)) is not None:
                    groups[record.key] = f"group:{group}"  # never the name of an ungrouped video's key
    held = held_out(keys_by_class, fraction, groups)
    if not held:
        raise ConfigError(
            f"{data}: no class of the training split has two videos or more (two groups of clips, where the file "
            "names give groups), so none can be set aside for validation: pass --val-fraction 0 (validate on the "
            "test split)"
        )
    return Holdout(held, sum(map(len, keys_by_class.values())), fraction, len(groups))


def protocol(fraction: float, by_group: bool = False) -> str:
    """Which videos pick best.pt, in words: every table and summary says it."""
    if fraction == 0:
        return "validation on the test split, the paper's protocol: best.pt, and so the test figure, picked on test"
    part = "of each class's groups of clips (as the file names give them)" if by_group else "of each class"
    return f"validation on {fraction:g} {part} of the training split, held out: test not used to pick best.pt"
