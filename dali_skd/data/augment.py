"""The paper's augmentations, declared once: this table drives the host side's random draws (`source.augment_draws`),
the DALI graph (`pipeline.augment_clip`), the DataLoader baseline and the peers (`torch_baseline.augment`), the
preview's labels, and the defaults, limits and help of the `--augment.*` settings, which `AugmentConfig` (below)
names with their types.

Each is applied to a clip with its own probability, one draw per clip, in the table's order, after the crop
window. Adding one is an entry here: its name, probability and parameter, its DALI operator (on an FHWC uint8 clip)
and its torch operator (on a 3 x T x H x W float view of 0-255 values), each given the drawn parameter; and its
settings in `AugmentConfig` (a test checks that the two agree). It changes
the stream of draws (`source.data_stream`), so runs trained before it are not resumed by the code after it.

Light on purpose: the CLI reads this table before torch or DALI are imported, so a DALI operator is given DALI's
`fn` module, and the torch operators import what tensor methods do not give them where they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dali_skd.settings import Range, setting, settings

# RGB <-> YIQ: a hue rotation is a rotation of the I/Q plane (what DALI's hue operator does)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(view: Any, degrees: float) -> Any:
    """DALI's `hue`: the I/Q plane turned by `degrees`, in DALI's sense."""
    a = math.radians(degrees)
    turn = np.array([[1, 0, 0], [0, math.cos(a), math.sin(a)], [0, -math.sin(a), math.cos(a)]])
    matrix = view.new_tensor(np.linalg.inv(_RGB2YIQ) @ turn @ _RGB2YIQ)
    return (matrix @ view.reshape(3, -1)).reshape(view.shape)


def gaussian_blur(view: Any, sigma: float) -> Any:
    """DALI's `gaussian_blur`: a window of 2 ceil(3 sigma) + 1, borders mirrored without repeating the edge."""
    import torch.nn.functional as F  # loaded already wherever a view is blurred

    radius = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = view.new_tensor(k / k.sum()).view(1, 1, -1)
    c, t, h, w = view.shape
    rows = F.conv1d(F.pad(view.reshape(-1, 1, w), (radius, radius), mode="reflect"), k).reshape(c, t, h, w)
    cols = rows.transpose(2, 3).reshape(-1, 1, h)
    cols = F.conv1d(F.pad(cols, (radius, radius), mode="reflect"), k)
    return cols.reshape(c, t, w, h).transpose(2, 3)


def split_channel(fn: Any, clip: Any, channel: Any) -> Any:
    """One channel of an FHWC clip copied into all three."""
    one = clip[:, :, :, channel]
    return fn.stack(one, one, one, axis=3, axis_name="C")


@dataclass(frozen=True)
class Augmentation:
    """One augmentation: applied to a clip when a coin with probability `p` says so, with a parameter drawn
    uniformly from `range`, or among `choices` (one character names each), or none."""

    name: str
    p: float  # the default probability: a flag --augment.p-NAME
    what: str  # for the flags' help: "a horizontal flip"
    torch: Callable[[Any, Any], Any]  # (3 x T x H x W float view, parameter) -> view
    # (DALI's fn, FHWC uint8 clip, parameter) -> clip; None: done by `pipeline.to_network_input` as it normalises
    dali: Callable[[Any, Any, Any], Any] | None
    range: tuple[float, float] | None = None  # a flag --augment.NAME LO HI
    range_help: str = ""
    limits: Mapping[str, float] = field(default_factory=lambda: {"at_least": 0})  # of the range's ends (`setting`)
    choices: str = ""
    label: str = "{}"  # the preview's words for a draw, formatted with the parameter (`{}`) or the choice's character

    def describe(self, parameter: float | int | None) -> str:
        shown = self.choices[int(parameter)] if self.choices else parameter
        return self.label.format(shown)


AUGMENTATIONS: dict[str, Augmentation] = {
    a.name: a
    for a in (
        Augmentation(
            "contrast", 0.5, "a contrast change",
            torch=lambda v, c: (v - 128) * c + 128,  # about the grey level 128, DALI's centre
            dali=lambda fn, clip, c: fn.brightness_contrast(clip, contrast=c),
            range=(0.6, 1.4), range_help="contrast factor range (1: unchanged)", label="contrast {:.2f}x",
        ),
        Augmentation(
            "brightness", 0.5, "a brightness change",
            torch=lambda v, b: v * b,
            dali=lambda fn, clip, b: fn.brightness_contrast(clip, brightness=b),
            range=(0.6, 1.4), range_help="brightness factor range (1: unchanged)", label="brightness {:.2f}x",
        ),
        Augmentation(
            "hue", 0.5, "a hue rotation",
            torch=rotate_hue,
            dali=lambda fn, clip, h: fn.hue(clip, hue=h),
            range=(-30.0, 30.0), range_help="hue rotation range in degrees", label="hue {:+.0f}°",
            limits={"at_least": -180, "at_most": 180},
        ),
        Augmentation(
            "blur", 0.5, "a Gaussian blur",
            torch=gaussian_blur,
            dali=lambda fn, clip, s: fn.gaussian_blur(clip, sigma=s),
            range=(0.1, 2.0), range_help="Gaussian blur sigma range in pixels", label="blur σ {:.2f}",
            limits={"more_than": 0},
        ),
        Augmentation(
            "channel_split", 0.5, "copying one random colour channel into all three",
            torch=lambda v, c: v[c].expand(3, -1, -1, -1),
            dali=split_channel,
            choices="RGB", label="split {}",
        ),
        Augmentation(
            "flip", 0.5, "a horizontal flip",
            torch=lambda v, _: v.flip(-1),
            dali=None,  # a mirror costs nothing in the pass that normalises: no pass of its own
            label="flip",
        ),
    )
}  # fmt: skip


def ranged() -> list[Augmentation]:
    """The augmentations whose parameter is drawn from a range, in the table's order."""
    return [a for a in AUGMENTATIONS.values() if a.range is not None]


def chosen() -> list[Augmentation]:
    """The augmentations whose parameter is one of a few choices, in the table's order."""
    return [a for a in AUGMENTATIONS.values() if a.choices]


CROP = ("crop_x", "crop_y")  # the crop window's place in [0, 1], drawn for every view, augmented or not


def draw_layout() -> tuple[str, ...]:
    """Every uniform draw the host side makes for one view, in its order: the crop window's place, each ranged
    parameter, each augmentation's coin, each choice (a training batch draws them for all its views at once)."""
    return (
        *CROP,
        *(f"{a.name} value" for a in ranged()),
        *(f"{name} coin" for name in AUGMENTATIONS),
        *(f"{a.name} choice" for a in chosen()),
    )


def chance(name: str) -> Any:
    """The probability setting of augmentation `name` of the table: `--augment.p-NAME`."""
    a = AUGMENTATIONS[name]
    return setting(a.p, f"probability of {a.what}", at_least=0, at_most=1)


def span(name: str) -> Any:
    """The range setting of augmentation `name` of the table, whose parameter it draws from: `--augment.NAME LO HI`."""
    a = AUGMENTATIONS[name]
    assert a.range is not None, f"augmentation {name} draws no parameter from a range"
    return setting(a.range, a.range_help, **a.limits)


@settings
class AugmentConfig:
    """The paper's augmentations (`data/augment.py`), each applied with its probability, one draw per clip: its
    probability and (if it draws its parameter from one) its range, in the table's order. The table gives each
    setting its default, limits and help; a test checks that the two list the same augmentations."""

    p_contrast: float = chance("contrast")
    contrast: Range = span("contrast")
    p_brightness: float = chance("brightness")
    brightness: Range = span("brightness")
    p_hue: float = chance("hue")
    hue: Range = span("hue")
    p_blur: float = chance("blur")
    blur: Range = span("blur")
    p_channel_split: float = chance("channel_split")
    p_flip: float = chance("flip")

    def chances(self) -> dict[str, float]:
        """Each augmentation's probability, by its name, in the table's order."""
        return {
            "contrast": self.p_contrast,
            "brightness": self.p_brightness,
            "hue": self.p_hue,
            "blur": self.p_blur,
            "channel_split": self.p_channel_split,
            "flip": self.p_flip,
        }

    def ranges(self) -> dict[str, Range]:
        """The range of each augmentation that draws its parameter from one (`augment.ranged()`), by its name."""
        return {"contrast": self.contrast, "brightness": self.brightness, "hue": self.hue, "blur": self.blur}

    def crop_and_flip(self) -> AugmentConfig:
        """These settings with every augmentation but the flip off (the random crop is not one: it is always made)."""
        return replace(self, p_contrast=0, p_brightness=0, p_hue=0, p_blur=0, p_channel_split=0)
