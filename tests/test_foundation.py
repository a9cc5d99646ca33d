"""Issue 2: the build, the import boundaries and the entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import lossympi
from lossympi import _core


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_extension_module_imports_and_reports_its_version():
    assert _core.__version__ == lossympi.__version__
    assert _core.__file__.endswith(".so")


def test_import_lossympi_never_imports_tensorflow():
    code = (
        "import sys, lossympi, lossympi.endpoint, lossympi.faults, lossympi.bootstrap, lossympi.wire, "
        "lossympi.fill, lossympi.__main__; print('tensorflow' in sys.modules)"
    )
    assert _run(code).strip() == "False"


def test_aggregathor_imports_tensorflow_and_finds_the_cpu():
    out = _run("import json, aggregathor; print(json.dumps(aggregathor.devices()))")
    devices = json.loads(out.strip().splitlines()[-1])
    assert devices["CPU"], devices


def test_py_typed_markers_ship_with_both_packages():
    from importlib.resources import files

    assert files("lossympi").joinpath("py.typed").is_file()
    assert files("aggregathor").joinpath("py.typed").is_file()


def test_selftest_command_reports_the_injected_loss():
    proc = subprocess.run([sys.executable, "-m", "lossympi", "selftest", "--json", "--elements", "200000",
                           "--loss", "0.1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["mask_matches_injector"] and report["received_values_exact"]
    assert report["chunks_lost"] == report["chunks_dropped_by_injector"] > 0
    assert 0.8 < report["delivered_fraction"] < 0.97


def test_info_command_prints_kernel_capabilities():
    proc = subprocess.run([sys.executable, "-m", "lossympi", "info", "--json"], capture_output=True,
                          text=True, timeout=60, check=True)
    info = json.loads(proc.stdout)
    assert {"udp_gso", "udp_gro", "rmem_max", "sch_netem"} <= info.keys()
