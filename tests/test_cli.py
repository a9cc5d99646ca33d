"""``aggregathor train --help`` explains every setting."""

from __future__ import annotations

import dataclasses

from aggregathor.__main__ import FLAG_HELP
from aggregathor.config import TrainConfig


def test_every_flag_has_a_help_text() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"gar_options", "attack_options"}
    assert fields <= set(FLAG_HELP), f"no --help text for {sorted(fields - set(FLAG_HELP))}"
    assert set(FLAG_HELP) <= fields, f"--help text for settings that do not exist: {sorted(set(FLAG_HELP) - fields)}"
