"""User code by reference (``file.py:attr``, ``package.module:attr``) and by entry point, for experiments,
rules and attacks; every bad reference gets a one-line ValueError naming it and what was found."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aggregathor import attacks, experiments, gars
from aggregathor._registry import file_module_name, reference_of
from aggregathor.experiments.keras_experiment import KerasExperiment

EXP = "a KerasExperiment, an Experiment subclass or a factory of either"

USER_CODE = '''
import keras
import numpy as np
import tensorflow as tf

from aggregathor.attacks import Attack
from aggregathor.experiments import Experiment
from aggregathor.experiments.keras_experiment import KerasExperiment
from aggregathor.gars import GAR

rng = np.random.default_rng(0)
x = rng.standard_normal((40, 4)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
TOKEN = object()  # identity shows whether the module ran twice


def build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


exp = KerasExperiment(build, (x[:30], y[:30]), (x[30:], y[30:]), name="user")


def make_exp(label="made"):
    return KerasExperiment(build, (x[:30], y[:30]), (x[30:], y[30:]), name=label)


def make_class():
    return Tiny


class Tiny(Experiment):
    name = "tiny-user"
    input_shape = (4,)
    num_classes = 2
    defaults = {"hidden": 3}

    def _load(self):
        return (x[:30], y[:30]), (x[30:], y[30:])

    def _make_model(self):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(self.options["hidden"]),
                                 keras.layers.Dense(2)])


class Mean(GAR):
    name = "user-mean"

    def aggregate(self, g):
        return tf.reduce_mean(g, axis=0)


def make_rule(n, f, scale=1.0):
    rule = Mean(n, f)
    rule.scale = scale
    return rule


def make_rule_class(n, f):
    return Mean


class Zero(Attack):
    name = "zero"

    def __init__(self, value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def forge(self, honest, f, rng):
        return np.full((f, honest.shape[1]), self.value)


zero = Zero()


def make_attack(value=2.0):
    return Zero(value)


def returns_int():
    return 3


def returns_none():
    return None


number = 7


class NotAnExperiment:
    pass


class Factories:
    @staticmethod
    def experiment():
        return make_exp("dotted")
'''


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_code.py"
    path.write_text(USER_CODE)
    yield path
    sys.modules.pop(file_module_name(str(path)), None)


@pytest.fixture()
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "refpkg_user"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "code.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "refpkg_user.code"
    for name in ("refpkg_user.code", "refpkg_user"):
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------- references that work
def test_file_reference_imports_once_under_a_stable_name(user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = f"{user_file}:exp"
    exp = experiments.get(ref)
    assert isinstance(exp, KerasExperiment) and exp.name == "user" and exp.reference == ref
    module = sys.modules[file_module_name(str(user_file))]
    assert module.exp is exp
    # a relative path to the same file is the same module: the file does not run twice
    monkeypatch.chdir(user_file.parent)
    assert experiments.get("user_code.py:exp") is exp
    assert sys.modules[file_module_name("user_code.py")].TOKEN is module.TOKEN
    assert file_module_name("user_code.py") == file_module_name(str(user_file))
    other = user_file.parent / "sub" / "user_code.py"
    assert file_module_name(str(other)) != file_module_name(str(user_file))
    assert file_module_name(str(user_file)).startswith("aggregathor_user_user_code_")


def test_module_reference_class_factory_and_instance(user_package: str) -> None:
    mod = user_package
    assert experiments.get(f"{mod}:exp").name == "user"
    assert experiments.get(f"{mod}:make_exp").name == "made"  # a zero-argument factory
    assert experiments.get(f"{mod}:make_exp", label="opt").name == "opt"  # options reach the factory
    tiny = experiments.get(f"{mod}:Tiny", hidden=5)  # an Experiment subclass, with an option
    assert tiny.name == "tiny-user" and tiny.options == {"hidden": 5}
    assert experiments.get(f"{mod}:make_class").options == {"hidden": 3}  # a factory returning a subclass
    model = tiny.build_model(0)
    assert model.layers[0].units == 5 and set(tiny.evaluate(model)) == {"loss", "accuracy"}

    g = np.arange(10, dtype=np.float32).reshape(5, 2)
    rule = gars.get(f"{mod}:Mean", 5, 1)
    np.testing.assert_allclose(rule(g).numpy(), g.mean(axis=0))
    made = gars.get(f"{mod}:make_rule", 5, 1, scale=3.0)  # factory(n, f, **options)
    assert (made.n, made.f, made.scale) == (5, 1, 3.0)
    assert type(gars.get(f"{mod}:make_rule_class", 4, 1)).__name__ == "Mean"

    honest = np.ones((3, 2))
    np.testing.assert_array_equal(attacks.get(f"{mod}:Zero", value=1.5)(honest, 2), np.full((2, 2), 1.5))
    assert attacks.get(f"{mod}:zero").value == 0.0  # an instance
    assert attacks.get(f"{mod}:make_attack").value == 2.0


def test_reference_of_round_trips(user_file: Path, user_package: str) -> None:
    module = sys.modules.get(user_package) or __import__(user_package, fromlist=["exp"])
    assert reference_of(module.exp) == f"{user_package}:exp"
    exp = experiments.get(f"{user_file}:exp")
    ref = reference_of(exp)
    assert ref == f"{os.path.realpath(user_file)}:exp" and experiments.get(ref) is exp
    assert reference_of(object()) is None


# ---------------------------------------------------------------------- entry points
def _dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "epmod_user.py").write_text(USER_CODE)
    info = tmp_path / "epplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [aggregathor.experiments]
        ep-exp = epmod_user:make_exp
        [aggregathor.gars]
        ep-mean = epmod_user:Mean
        ep-broken = epmod_missing:Rule
        ep-int = epmod_user:number
        [aggregathor.attacks]
        ep-zero = epmod_user:Zero
        """))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_points_are_listed_and_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dist(tmp_path, monkeypatch)
    try:
        assert "ep-exp" in experiments.names() and "digits" in experiments.names()
        assert {"ep-mean", "ep-broken", "median"} <= set(gars.names())
        assert "ep-zero" in attacks.names()
        assert experiments.get("ep-exp").name == "made"
        assert gars.get("ep-mean", 4, 1).n == 4
        assert attacks.get("ep-zero", value=3.0).value == 3.0
        with pytest.raises(ValueError) as err:
            gars.get("ep-broken", 4, 1)
        assert str(err.value) == ("--gar ep-broken (entry point epmod_missing:Rule): cannot be loaded: "
                                  "ModuleNotFoundError: No module named 'epmod_missing'")
        with pytest.raises(ValueError) as err:
            gars.get("ep-int", 4, 1)
        assert str(err.value) == ("--gar ep-int (entry point epmod_user:number): 'number' is an int, expected "
                                  "a GAR subclass or a factory(n, f) returning a GAR")
    finally:
        sys.modules.pop("epmod_user", None)
        monkeypatch.undo()
    assert "ep-exp" not in experiments.names()  # gone with the distribution


# ---------------------------------------------------------------------- bad references: one line each
def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_file_references(user_file: Path, tmp_path: Path) -> None:
    p = str(user_file)
    missing = tmp_path / "nope.py"
    assert _message(experiments.get, f"{missing}:exp") == \
        f"--experiment {missing}:exp: no file {missing} (looked for {os.path.realpath(missing)})"
    found = _message(experiments.get, f"{p}:expp")
    assert found.startswith(f"--experiment {p}:expp: {p} has no attribute 'expp' (found: Attack, Experiment, "
                            "Factories, GAR, KerasExperiment, Mean, NotAnExperiment, TOKEN, Tiny, Zero, build, exp, ")
    assert "keras" not in found.split("(found:")[1]  # imported modules are not listed
    assert _message(experiments.get, f"{p}:returns_int") == \
        f"--experiment {p}:returns_int: 'returns_int' is a function returning int, expected {EXP}"
    assert _message(experiments.get, f"{p}:returns_none") == \
        f"--experiment {p}:returns_none: 'returns_none' is a function returning None, expected {EXP}"
    assert _message(experiments.get, f"{p}:number") == f"--experiment {p}:number: 'number' is an int, expected {EXP}"
    assert _message(experiments.get, f"{p}:NotAnExperiment") == \
        f"--experiment {p}:NotAnExperiment: 'NotAnExperiment' is the class NotAnExperiment, expected {EXP}"
    assert _message(experiments.get, f"{p}:Mean") == \
        f"--experiment {p}:Mean: 'Mean' is the class Mean, expected {EXP}"
    assert _message(experiments.get, f"{p}:exp", label="x") == \
        f"--experiment {p}:exp: 'exp' is already built (a KerasExperiment) and takes no arguments; " \
        "name its class or a factory instead"
    assert _message(gars.get, f"{p}:returns_int", 5, 1) == \
        f"--gar {p}:returns_int: cannot call returns_int(5, 1): too many positional arguments"
    assert _message(gars.get, f"{p}:Zero", 5, 1) == \
        f"--gar {p}:Zero: 'Zero' is the class Zero, expected a GAR subclass or a factory(n, f) returning a GAR"
    assert _message(attacks.get, f"{p}:make_attack", colour=1) == \
        f"--attack {p}:make_attack: cannot call make_attack(colour=...): got an unexpected keyword argument 'colour'"
    assert _message(gars.get, f"{p}:Mean", 5, 1, pre=["nnm"]) == \
        f"--gar {p}:Mean: pre-aggregation wrappers (pre=) apply to the built-in rules only; drop pre or apply " \
        "the wrappers inside your rule"


def test_bad_reference_forms_and_imports(tmp_path: Path) -> None:
    broken = tmp_path / "broken_user.py"
    broken.write_text("x = 1\ny = 1 / 0\n")
    assert _message(attacks.get, f"{broken}:x") == \
        f"--attack {broken}:x: importing {broken} raised ZeroDivisionError: division by zero"
    assert file_module_name(str(broken)) not in sys.modules  # a failed import leaves nothing behind
    syntax = tmp_path / "syntax_user.py"
    syntax.write_text("def (:\n")
    assert _message(attacks.get, f"{syntax}:x").startswith(f"--attack {syntax}:x: importing {syntax} raised "
                                                         "SyntaxError: invalid syntax")
    text = tmp_path / "data.txt"
    text.write_text("")
    assert _message(experiments.get, f"{text}:x") == \
        f"--experiment {text}:x: {text} is not a .py file; name a Python file or a module"
    assert _message(gars.get, "no_such_pkg_user.rules:R", 5, 1) == \
        "--gar no_such_pkg_user.rules:R: cannot import no_such_pkg_user.rules: ModuleNotFoundError: " \
        "No module named 'no_such_pkg_user'"
    assert _message(gars.get, "aggregathor.gars.median:Nope", 5, 1).startswith(
        "--gar aggregathor.gars.median:Nope: aggregathor.gars.median has no attribute 'Nope' (found: ")
    for bad in (":exp", "mine.py:", "mine.py:1x", "mine.py:a-b"):
        assert _message(experiments.get, bad) == \
            f"--experiment {bad}: expected path/to/file.py:attr or package.module:attr"
    assert _message(experiments.get, "mine.py") == "--experiment mine.py: name the object in the file, as mine.py:attr"
    assert _message(experiments.get, "imagenet").startswith("unknown experiment 'imagenet'; known: cifar10, digits")
    assert _message(gars.get, "nope", 5, 1).endswith("; or name your own as path/to/file.py:attr or "
                                                     "package.module:attr")


def test_dotted_attribute(user_package: str) -> None:
    assert experiments.get(f"{user_package}:Factories.experiment").name == "dotted"
    assert _message(experiments.get, f"{user_package}:Factories.nope") == \
        f"--experiment {user_package}:Factories.nope: {user_package}:Factories has no attribute 'nope' " \
        "(found: experiment)"
