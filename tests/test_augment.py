"""The augmentation table (`data/augment.py`) drives the host side's draws, the DALI graph, the DataLoader baseline,
the preview and the defaults, limits and help of the --augment.* settings, which `config.AugmentConfig` names with
their types; its layout of draws is the data stream a checkpoint records. A seventh augmentation is one table
entry, with its two operators, and its two settings."""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from clipdata import gradient_frames, noise_frames, write_dataset

from dali_skd.cli_options import flag, leaves
from dali_skd.commands.preview import PreviewConfig, describe, preview_samples
from dali_skd.config import ClipConfig, LoaderConfig, SamplingConfig, TrainConfig
from dali_skd.data.augment import AUGMENTATIONS, Augmentation, AugmentConfig, chance, draw_layout, span
from dali_skd.data.source import augment_draws, data_stream
from dali_skd.settings import Range, limits_of, settings
from dali_skd.training import train

TODAY = (  # the six augmentations' draws, in the order every run so far was trained with
    "crop_x", "crop_y", "contrast value", "brightness value", "hue value", "blur value", "contrast coin",
    "brightness coin", "hue coin", "blur coin", "channel_split coin", "flip coin", "channel_split choice",
)  # fmt: skip


def test_the_table_gives_the_flags_the_draws_and_the_stream() -> None:
    assert draw_layout() == TODAY
    names = [f.name for f in fields(AugmentConfig)]
    assert names == [
        "p_contrast", "contrast", "p_brightness", "brightness", "p_hue", "hue", "p_blur", "blur", "p_channel_split",
        "p_flip",
    ]  # fmt: skip
    assert [flag(("augment", *path)) for path, _, _ in leaves(AugmentConfig)][:2] == [
        "--augment.p-contrast",
        "--augment.contrast",
    ]
    rng = np.random.default_rng(0)
    always = AugmentConfig(**{f"p_{name}": 1.0 for name in AUGMENTATIONS})
    never = AugmentConfig(**{f"p_{name}": 0.0 for name in AUGMENTATIONS})
    on, off = augment_draws(rng, 500, 2, always), augment_draws(rng, 500, 2, never)
    assert on["coin"].shape == (500, 2, 6) and on["coin"].all() and not off["coin"].any()
    assert on["value"].shape == (500, 2, 6) and on["choice"].shape == (500, 2, 1)
    hue = on["value"][..., 4]
    assert -30 <= hue.min() < -25 and 25 < hue.max() <= 30  # its range
    assert set(np.unique(on["choice"])) == {0, 1, 2}  # R, G or B
    assert augment_draws(rng, 3, 2, None)["value"].shape == (3, 2, 2)  # only the crop window, from the same draws
    assert re.fullmatch(r"2-[0-9a-f]{8}", data_stream())


PYDANTIC_LIMITS = {"at_least": "ge", "more_than": "gt", "at_most": "le"}  # the table's limits as pydantic names them


def test_the_settings_are_the_tables_by_name_with_their_types() -> None:
    info = AugmentConfig.__pydantic_fields__
    ranged = [a for a in AUGMENTATIONS.values() if a.range is not None]
    assert [f.name for f in fields(AugmentConfig)] == [
        name for a in AUGMENTATIONS.values() for name in (f"p_{a.name}", a.name)[: 1 + (a.range is not None)]
    ]
    cfg = AugmentConfig()
    assert list(cfg.chances()) == list(AUGMENTATIONS) and list(cfg.ranges()) == [a.name for a in ranged]
    for a in AUGMENTATIONS.values():
        assert cfg.chances()[a.name] == a.p and info[f"p_{a.name}"].description == f"probability of {a.what}"
    for a in ranged:
        assert cfg.ranges()[a.name] == a.range and info[a.name].description == a.range_help
        assert limits_of(info[a.name]) == {PYDANTIC_LIMITS[k]: v for k, v in a.limits.items()}
    changed = AugmentConfig(p_hue=0.25, blur=(0.5, 1.0))
    assert changed.chances()["hue"] == 0.25 and changed.ranges()["blur"] == (0.5, 1.0)


def test_no_setting_is_read_by_a_name_made_as_the_code_runs() -> None:
    """No config class made at run time (`make_dataclass`), no attribute read by a name built from a string: a
    reader (and a type checker) follows every setting by its name."""
    repo = Path(__file__).resolve().parents[1]
    found = []
    for path in [*repo.glob("dali_skd/**/*.py"), *repo.glob("preprocess/*.py"), repo / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            named = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if named == "make_dataclass":
                found.append(f"{path.name}:{node.lineno} make_dataclass")
            by_name = isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr")
            if by_name and len(node.args) > 1 and isinstance(node.args[1], ast.JoinedStr):
                found.append(f"{path.name}:{node.lineno} an attribute named by an f-string")
    assert found == []


def noop(calls: list[str]) -> Augmentation:
    """An augmentation that changes nothing, counting the calls of its operators."""

    def dali(fn, clip, factor):
        calls.append("dali")
        return clip

    def torch_op(view, factor):
        calls.append("torch")
        return view

    return Augmentation(
        "noop",
        1.0,
        "nothing",
        torch=torch_op,
        dali=dali,
        range=(0.5, 1.5),
        range_help="its factor",
        label="noop {:.1f}",
    )


@pytest.mark.slow
def test_a_seventh_augmentation_is_one_table_entry_and_runs_through_dali_and_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "d", {"train": [(gradient_frames(20), 0), (gradient_frames(24), 1)]}, ["a", "b"])
    before = data_stream()
    calls: list[str] = []
    monkeypatch.setitem(AUGMENTATIONS, "noop", noop(calls))

    @settings
    class Augment7(AugmentConfig):  # its two settings, named with their types; their defaults, help: the table's
        p_noop: float = chance("noop")
        noop: Range = span("noop")

        def chances(self) -> dict[str, float]:
            return {**super().chances(), "noop": self.p_noop}

        def ranges(self) -> dict[str, Range]:
            return {**super().ranges(), "noop": self.noop}

    assert [flag(path) for path, _, _ in leaves(Augment7)][:2] == ["--p-noop", "--noop"]
    assert draw_layout() == (*TODAY[:6], "noop value", *TODAY[6:12], "noop coin", TODAY[12])
    assert data_stream() != before  # runs trained before it do not resume on it
    augment = Augment7(**{f"p_{name}": 1.0 if name in ("noop", "hue") else 0.0 for name in AUGMENTATIONS})
    cfg = PreviewConfig(
        data=str(data), device="cpu", samples=2, clip=ClipConfig(length=8, crop=64), loader=LoaderConfig(threads=1),
        augment=augment, compare_baseline=True,
    )  # fmt: skip
    samples = preview_samples(cfg)  # the training loader's DALI pipeline, then the baseline, with the same draws
    assert calls.count("dali") == 2 and calls.count("torch") == 4  # in the graph once per view; per view drawn
    for sample in samples:
        for v in (0, 1):
            assert list(sample.draws[v].applied) == ["hue", "noop"] and 0.5 <= sample.draws[v].applied["noop"] <= 1.5
            assert "noop" in describe(sample.draws[v], 64)
            diff = np.abs(sample.views[v].astype(int) - sample.baseline[v].astype(int))
            assert diff.mean() < 1.5  # the hue the noop left alone, as DALI and the baseline both turn it


@pytest.mark.slow
def test_a_resume_on_another_data_stream_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = [(noise_frames(12, seed=i, tint=i % 2), i % 2) for i in range(6)]
    data = write_dataset(tmp_path / "d", {"train": videos[:4], "test": videos[4:]}, ["a", "b"])
    cfg = TrainConfig(
        arch="r3d10-tiny", data=str(data), out=str(tmp_path / "run"), epochs=1, batch_size=2, device="cpu",
        clip=ClipConfig(length=8, crop=32), sampling=SamplingConfig(shuffle_buffer=2), loader=LoaderConfig(threads=1),
    )  # fmt: skip
    train(cfg)
    then = data_stream()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["data_stream"] == then
    monkeypatch.setitem(AUGMENTATIONS, "noop", noop([]))
    cfg.epochs, cfg.resume = 2, True
    with pytest.raises(ValueError) as refused:
        train(cfg)
    message = str(refused.value)
    assert f"was trained on data stream '{then}' (draws per view: {', '.join(TODAY)})" in message
    assert f"this code draws stream '{data_stream()}'" in message and "noop value" in message
    assert "pass a new --out" in message
