"""The typed configuration: comparing saved settings with current ones."""

from __future__ import annotations

from dali_skd.config import TrainConfig, changed_settings, format_changes, to_dict


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
