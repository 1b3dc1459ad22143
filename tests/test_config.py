"""The typed configuration: flags into configs (`cli_options`, one convention for every command), the layers a
config is built from, and comparing saved settings with current ones."""

from __future__ import annotations

import importlib
import json
import re
import typing
from pathlib import Path
from typing import Any

import click
import pytest
from clickit import invoke
from conftest import write_checkpoint

import cli
from dali_skd.cli_options import flag, leaves
from dali_skd.config import (
    ClipConfig,
    OptimConfig,
    ScoreSettings,
    TrainConfig,
    changed_settings,
    format_changes,
    save_json,
    to_dict,
)

COMMANDS = [name for name in cli.Commands.lazy if name != "plot"]  # plot takes a run directory, no config


def command(name: str) -> click.Command:
    return cli.main.get_command(click.Context(cli.main), name)


def config_of(name: str) -> type:
    """A command's config class: `<Name>Config` of its module (`train`'s is the saved run's, `config.TrainConfig`)."""
    module = importlib.import_module(f"dali_skd.commands.{name}")
    return getattr(module, f"{name.capitalize()}Config")


def parsed(name: str, *args: str) -> Any:
    """What `cli.py NAME ARGS` runs with: the flags parsed by click, then the config built as the CLI builds it."""
    options: dict[str, Any] = command(name).make_context(name, ["video.mp4"] * (name == "predict") + list(args)).params
    options.pop("videos", None)
    config_file = options.pop("config_file")
    cls = config_of(name)
    if issubclass(cls, ScoreSettings):  # eval, predict, features: the clip settings a checkpoint was trained with
        return cli.checkpoint_config(cls, options, config_file)
    return cli.build_config(cls, options, config_file)


def test_flags_land_in_their_nested_fields_and_nothing_else_changes() -> None:
    cfg = parsed(
        "train", "--clip.crop", "64", "--augment.contrast", "0.5", "1.5", "--optim.lr", "0.1", "--no-channels-last",
        "--shortcut", "B", "--objective.tau", "4", "--sampling.same-clip",
    )  # fmt: skip
    assert (cfg.clip.crop, cfg.augment.contrast, cfg.optim.lr, cfg.channels_last) == (64, (0.5, 1.5), 0.1, False)
    assert (cfg.shortcut, cfg.objective.tau, cfg.sampling.same_clip) == ("B", 4.0, True)
    changed = changed_settings(to_dict(TrainConfig()), to_dict(cfg))
    assert list(changed) == [
        "augment.contrast", "channels_last", "clip.crop", "objective.tau", "optim.lr", "sampling.same_clip", "shortcut"
    ]  # fmt: skip
    assert parsed("train", "--sampling.no-same-clip").sampling.same_clip is False


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_is_the_dotted_path_of_a_field_and_nothing_else(name: str) -> None:
    """One convention for every command: `--name` at the top of its config, `--part.name` in a part; no field is
    renamed to dodge another, and each command offers the flags of its own config's fields, --config and --help."""
    cls = config_of(name)
    expected = {flag(path) for path, _, _ in leaves(cls)}
    offered = {opt for p in command(name).params if isinstance(p, click.Option) for opt in p.opts}
    assert offered == expected | {"--config"}
    help_text = invoke(name, "--help").output
    listed = set(re.findall(r"^  (?:-h, )?(--[a-z][\w.-]*)", help_text, re.M))
    assert listed == expected | {"--config", "--help"}
    for path, _, kind in leaves(cls):  # a Literal's values reach the config as click.Choice's strings
        assert all(isinstance(value, str) for value in literal_values(kind)), ".".join(path)


def test_eval_offers_none_of_the_training_flags() -> None:
    help_text = invoke("eval", "--help").output
    for training_only in ("--sampling.", "--shuffle-buffer", "--same-clip", "--train-shards", "--optim.", "--augment."):
        assert training_only not in help_text
    assert "--clip.crop" in help_text and "--loader.threads" in help_text and "--eval-shards" in help_text


def literal_values(kind: Any) -> list[Any]:
    """The values of a Literal annotation, or of the Literals inside one (`Literal["A", "B"] | None`)."""
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    return [value for arg in typing.get_args(kind) for value in literal_values(arg)]


def test_a_saved_config_then_the_flags_given(tmp_path: Path) -> None:
    saved = TrainConfig(optim=OptimConfig(lr=0.2), epochs=3, data="data/ucf101", clip=ClipConfig(crop=80))
    save_json(saved, tmp_path / "c.json")
    cfg = parsed("train", "--config", str(tmp_path / "c.json"), "--clip.crop", "96", "--epochs", "5")
    assert (cfg.optim.lr, cfg.epochs, cfg.data, cfg.clip.crop) == (0.2, 5, "data/ucf101", 96)
    assert cfg.clip.length == ClipConfig().length  # neither in the file nor given: the default
    (tmp_path / "bad.json").write_text(json.dumps({"clip": {"crop_size": 3}}))
    with pytest.raises(ValueError, match=r"bad.json.clip: unknown setting 'crop_size' \(known: length, "):
        parsed("train", "--config", str(tmp_path / "bad.json"))


def test_eval_cuts_clips_as_the_checkpoint_was_trained_unless_a_file_or_a_flag_says_otherwise(tmp_path: Path) -> None:
    """defaults < the checkpoint's < --config < the flags given: eval, predict and features alike."""
    from dali_skd.checkpoint import trained_clip

    trained = TrainConfig(clip=ClipConfig(length=8, frame_stride=2, crop=96, norm="kinetics"))
    checkpoint = str(write_checkpoint(tmp_path / "best.pt", trained))
    assert trained_clip(checkpoint) == {"length": 8, "frame_stride": 2, "crop": 96, "norm": "kinetics"}
    for name in ("eval", "predict", "features"):
        cfg = parsed(name, "--checkpoint", checkpoint, "--clip.crop", "64", "--batch-size", "4")
        assert (cfg.clip.length, cfg.clip.frame_stride, cfg.clip.crop, cfg.clip.norm) == (8, 2, 64, "kinetics")
        assert cfg.batch_size == 4 and cfg.clips_per_video == 10
    (tmp_path / "some.json").write_text(json.dumps({"checkpoint": checkpoint, "clip": {"length": 4}}))
    cfg = parsed("eval", "--config", str(tmp_path / "some.json"), "--clip.crop", "64")
    assert (cfg.clip.length, cfg.clip.frame_stride, cfg.clip.crop, cfg.clip.norm) == (4, 2, 64, "kinetics")
    assert trained_clip(tmp_path / "missing.pt") == {}  # loading it then says what is wrong
    assert parsed("eval", "--checkpoint", str(tmp_path / "missing.pt")).clip == ClipConfig()


def test_changed_settings_names_each_nested_difference_by_its_dotted_path() -> None:
    saved = to_dict(TrainConfig())
    current = to_dict(TrainConfig(optim=OptimConfig(lr=0.5)))
    current["clip"]["crop"] = 64
    current["augment"]["contrast"] = (0.5, 1.5)
    assert changed_settings(saved, saved) == {}
    assert changed_settings(saved, current) == {
        "augment.contrast": ((0.6, 1.4), (0.5, 1.5)),
        "clip.crop": (112, 64),
        "optim.lr": (0.01, 0.5),
    }
    # a setting only one side holds differs too, even from None
    one_sided = changed_settings({"fps": None, "videos": {"train": "ab"}}, {"videos": {"train": "ab", "test": "cd"}})
    assert list(one_sided) == ["fps", "videos.test"]
    assert format_changes(changed_settings({"fps": None}, {})) == "fps: None then, (not set) now"
    assert format_changes(changed_settings({"lr": 0.01}, {"lr": 0.5})) == "lr: 0.01 then, 0.5 now"


def test_resume_is_a_flag_or_takes_auto() -> None:
    assert parsed("train").resume is False and parsed("train", "--resume").resume is True
    assert parsed("train", "--resume", "auto").resume == "auto" and parsed("train", "--resume=auto").resume == "auto"
    assert parsed("train", "--resume", "--epochs", "3").resume is True  # a flag after it is not its value
    with pytest.raises(click.BadParameter, match="'later' is not 'auto'"):
        parsed("train", "--resume", "later")


def test_method_names_come_from_the_one_registry() -> None:
    from dali_skd.methods import METHODS

    assert f"--method [{'|'.join(METHODS)}]" in invoke("train", "--help").output
    result = invoke("train", "--method", "simsiam", expect_error=True)
    assert result.exit_code == 2 and "'simsiam' is not one of 'baseline', " in result.output


def test_a_flag_named_by_its_last_part_is_answered_with_its_dotted_path() -> None:
    """`--lr` was a flag before each command had its own config: click's spelling hints would not find
    `--optim.lr`, so the error names it."""
    result = invoke("train", "--lr", "0.1", expect_error=True)
    assert result.exit_code == 2 and "Did you mean '--optim.lr'?" in result.output
    result = invoke("eval", "--lr", "0.1", expect_error=True)  # eval has no optimizer: no hint that does nothing
    assert result.exit_code == 2 and "--optim.lr" not in result.output


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"epochs": "5"}, r"epochs is '5', not an integer"),
        ({"epochs": True}, r"epochs is True, not an integer"),
        ({"clip": 3}, r"clip is 3, not a group of settings"),
        ({"clip": {"norm": "imagenet"}}, r"clip.norm is 'imagenet', not one of 'paper', "),
        ({"augment": {"contrast": [0.5]}}, r"augment.contrast is \[0.5\], not a list of 2 numbers"),
        ({"optim": {"lr": "0.1"}}, r"optim.lr is '0.1', not a number"),
    ],
)
def test_a_saved_config_of_the_wrong_types_is_refused_naming_the_setting(
    tmp_path: Path, saved: dict, message: str
) -> None:
    """A config file (or a checkpoint's) is input from anyone: every value is checked against its setting's type."""
    (tmp_path / "c.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="c.json." + message):
        parsed("train", "--config", str(tmp_path / "c.json"))
    (tmp_path / "ok.json").write_text(json.dumps({"epochs": 5, "optim": {"lr": 1}, "augment": {"contrast": [0.5, 2]}}))
    cfg = parsed("train", "--config", str(tmp_path / "ok.json"))
    assert (cfg.epochs, cfg.optim.lr, cfg.augment.contrast) == (5, 1.0, (0.5, 2.0))
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "-3"], "--epochs is -3; it must be at least 1"),
        (["--batch-size", "0"], "--batch-size is 0; it must be at least 1"),
        (["--optim.lr", "-1"], "--optim.lr is -1.0; it must be more than 0"),
        (["--optim.lr", "nan"], "--optim.lr is nan; it must be a finite number"),
        (["--loader.stall-timeout", "inf"], "--loader.stall-timeout is inf; it must be a finite number"),
        (["--augment.p-flip", "1.5"], "--augment.p-flip is 1.5; it must be at most 1"),
        (["--augment.hue", "-200", "30"], "--augment.hue is -200.0 30.0; each of its numbers must be at least -180"),
        (["--augment.blur", "2", "1"], "--augment.blur is 2.0 1.0; a range is LO HI, with LO not above HI"),
        (["--augment.blur", "0", "1"], "--augment.blur is 0.0 1.0; each of its numbers must be more than 0"),
    ],
)
def test_a_number_outside_its_limits_is_refused_naming_the_flag(args: list[str], message: str) -> None:
    """`--epochs -3` trained nothing and exited 0; `--batch-size 0` ended in a ZeroDivisionError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parsed("train", *args)
    result = invoke("train", *args, expect_error=True)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_limits_hold_for_a_saved_config_and_the_defaults_are_within_them(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"objective": {"tau": 0}, "loader": {"prefetch": 2}}))
    with pytest.raises(ValueError, match=re.escape("c.json.objective.tau is 0.0; it must be more than 0")):
        parsed("train", "--config", str(tmp_path / "c.json"))
    assert "training epochs  [default: 200; at least 1]" in invoke("train", "--help").output  # said in the help
    for name in COMMANDS:  # every command's defaults pass its own checks
        parsed(name)
    assert parsed("train", "--loader.preallocate-width-hint", "-1", "--augment.hue", "-180", "180").augment.hue == (
        -180.0,
        180.0,
    )
