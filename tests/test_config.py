"""The typed configuration: flags into configs (`cli_options`), and comparing saved settings with current ones."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import click
import pytest

import cli
from dali_skd import config
from dali_skd.cli_options import _leaves, build_config
from dali_skd.config import LoaderConfig, TrainConfig, changed_settings, format_changes, save_json, to_dict


def train_config(*args: str) -> TrainConfig:
    """What `cli.py train ARGS` runs with: the flags parsed by click, then `build_config`."""
    options: dict[str, Any] = cli.train.make_context("train", list(args)).params
    return build_config(TrainConfig, options, options.pop("config_file"))


def test_flags_land_in_their_nested_fields_and_nothing_else_changes() -> None:
    cfg = train_config(
        "--crop", "64", "--contrast", "0.5", "1.5", "--lr", "0.1", "--no-channels-last", "--shortcut", "B",
        "--tau", "4",
    )  # fmt: skip
    assert (cfg.loader.crop, cfg.augment.contrast, cfg.lr, cfg.channels_last) == (64, (0.5, 1.5), 0.1, False)
    assert (cfg.shortcut, cfg.objective.tau) == ("B", 4.0)
    changed = changed_settings(to_dict(TrainConfig()), to_dict(cfg))
    assert list(changed) == ["augment.contrast", "channels_last", "loader.crop", "lr", "objective.tau", "shortcut"]


def test_a_saved_config_then_the_flags_given(tmp_path: Path) -> None:
    save_json(TrainConfig(lr=0.2, epochs=3, loader=LoaderConfig(data="data/ucf101", crop=80)), tmp_path / "c.json")
    cfg = train_config("--config", str(tmp_path / "c.json"), "--crop", "96", "--epochs", "5")
    assert (cfg.lr, cfg.epochs, cfg.loader.data, cfg.loader.crop) == (0.2, 5, "data/ucf101", 96)
    assert cfg.loader.clip_len == LoaderConfig().clip_len  # neither in the file nor given: the default


def test_eval_cuts_clips_as_the_checkpoint_was_trained_unless_a_flag_says_otherwise(tmp_path: Path) -> None:
    """`eval`'s clip flags default to the checkpoint's (`build_config(defaults=...)`), a flag given wins."""
    from dali_skd.checkpoint import save_checkpoint, trained_clip_settings
    from dali_skd.config import EvalConfig

    trained = TrainConfig(loader=LoaderConfig(clip_len=8, frame_stride=2, crop=96, input_norm="kinetics"))
    save_checkpoint(tmp_path / "best.pt", {"config": to_dict(trained)})
    defaults = {"loader": trained_clip_settings(tmp_path / "best.pt")}
    assert defaults == {"loader": {"clip_len": 8, "frame_stride": 2, "crop": 96, "input_norm": "kinetics"}}
    options: dict[str, Any] = cli.evaluate.make_context("eval", ["--crop", "64", "--batch-size", "4"]).params
    cfg = build_config(EvalConfig, options, defaults=defaults)
    assert (cfg.loader.clip_len, cfg.loader.frame_stride, cfg.loader.crop, cfg.loader.input_norm) == (
        8, 2, 64, "kinetics"
    )  # fmt: skip
    assert cfg.batch_size == 4 and cfg.loader.clips_per_video == LoaderConfig().clips_per_video
    assert trained_clip_settings(tmp_path / "missing.pt") == {}  # loading it then says what is wrong


CONFIGS = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_no_two_nested_fields_share_a_flag_and_choices_are_text(cls: type) -> None:
    """Every leaf field of a command's config is the flag of its name: two of one name would collide. A Literal
    field is a click.Choice, whose values are strings: a Literal of numbers would reach the config as text."""
    names = [path[-1] for path, _, _ in _leaves(cls)]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
    for path, _, kind in _leaves(cls):
        assert all(isinstance(value, str) for value in literal_values(kind)), ".".join(path)


def literal_values(kind: Any) -> list[Any]:
    """The values of a Literal annotation, or of the Literals inside one (`Literal["A", "B"] | None`)."""
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    return [value for arg in typing.get_args(kind) for value in literal_values(arg)]


def test_changed_settings_names_each_nested_difference_by_its_dotted_path() -> None:
    saved = to_dict(TrainConfig())
    current = to_dict(TrainConfig(lr=0.5))
    current["loader"]["crop"] = 64
    current["augment"]["contrast"] = (0.5, 1.5)
    assert changed_settings(saved, saved) == {}
    assert changed_settings(saved, current) == {
        "augment.contrast": ((0.6, 1.4), (0.5, 1.5)),
        "loader.crop": (112, 64),
        "lr": (0.01, 0.5),
    }
    # a setting only one side holds differs too, even from None
    one_sided = changed_settings({"fps": None, "videos": {"train": "ab"}}, {"videos": {"train": "ab", "test": "cd"}})
    assert list(one_sided) == ["fps", "videos.test"]
    assert format_changes(changed_settings({"fps": None}, {})) == "fps: None then, (not set) now"
    assert format_changes(changed_settings({"lr": 0.01}, {"lr": 0.5})) == "lr: 0.01 then, 0.5 now"


def test_resume_is_a_flag_or_takes_auto() -> None:
    assert train_config().resume is False and train_config("--resume").resume is True
    assert train_config("--resume", "auto").resume == "auto" and train_config("--resume=auto").resume == "auto"
    assert train_config("--resume", "--epochs", "3").resume is True  # a flag after it is not its value
    with pytest.raises(click.BadParameter, match="'later' is not 'auto'"):
        train_config("--resume", "later")
