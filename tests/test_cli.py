"""``aggregathor train --help`` explains every setting."""

from __future__ import annotations

import dataclasses

import pytest

from aggregathor.__main__ import FLAG_HELP
from aggregathor.config import TrainConfig


def test_every_flag_has_a_help_text() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"gar_options", "attack_options"}
    assert fields <= set(FLAG_HELP), f"no --help text for {sorted(fields - set(FLAG_HELP))}"
    assert set(FLAG_HELP) <= fields, f"--help text for settings that do not exist: {sorted(set(FLAG_HELP) - fields)}"


def test_train_help_names_the_run_directory_flags(capsys) -> None:
    from aggregathor.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--resume", "--verbose", "fresh runs/<UTC time>-<experiment>-<gar>", "--steps may be raised"):
        assert expected in text, expected
    assert "(default: None)" not in text
