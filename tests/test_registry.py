"""The shared name -> class registry behind rules, wrappers, attacks and experiments."""

from __future__ import annotations

import pytest

from aggregathor import attacks, experiments, gars
from aggregathor._registry import Registry
from aggregathor.gars import wrappers


def test_register_get_and_errors() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register
    class A:
        name = "a"

    assert reg.get("a") is A and reg.names() == ["a"] and reg.table() == {"a": A}
    with pytest.raises(ValueError, match=r"unknown widget 'b'; known: a"):
        reg.get("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(type("A2", (), {"name": "a"}))
    with pytest.raises(ValueError, match="empty"):
        reg.register(type("Nameless", (), {"name": ""}))


@pytest.mark.parametrize(("lookup", "kind"), [
    (lambda: gars.get("nope", 5, 1), "aggregation rule"),
    (lambda: gars.get("median", 5, 1, pre=["nope"]), "pre-aggregation wrapper"),
    (lambda: attacks.get("nope"), "attack"),
    (lambda: experiments.get("nope"), "experiment"),
])
def test_unknown_names_list_the_known_ones(lookup, kind: str) -> None:
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; known: "):
        lookup()


def test_packages_load_their_modules() -> None:
    assert {"median", "multi-krum", "bulyan"} <= set(gars.names())
    assert {"nnm", "bucketing", "clipping", "arc"} <= set(wrappers.names())
    assert {"alie", "ipm", "label-flip"} <= set(attacks.names())
    assert {"digits", "mnist", "cifar10", "synthetic"} <= set(experiments.names())


def test_entry_point_group_defaults_to_the_package() -> None:
    assert gars.REGISTRY.group == "aggregathor.gars" and attacks.REGISTRY.group == "aggregathor.attacks"
    assert experiments.REGISTRY.group == "aggregathor.experiments"
    assert wrappers.WRAPPERS.group == ""  # no package: no entry points, no reference hint
    with pytest.raises(ValueError) as err:
        wrappers.WRAPPERS.get("nope")
    assert "path/to/file.py:attr" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown attack 'nope'; known: .*; or name your own as path/to/file.py:attr"):
        attacks.get("nope")
