#!/usr/bin/env python3
"""Build lossympi's Cython core with AddressSanitizer and UndefinedBehaviorSanitizer, in a separate directory.

  python tools/sanitize_build.py                  # build (or reuse) out/sanitize/, check that the sanitizers are live
  python tools/fuzz_receive.py --sanitize ...     # build, then fuzz the sanitized core (see that tool)

``cython_src/_core.pyx`` is translated by Cython with the directives of ``setup.py`` and compiled by gcc with
``-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g`` and the include
directories and macros of ``setup.py`` (``-fwrapv``, which CPython's own flags add, is left out on purpose: a signed
overflow is then reported, not defined away). The result goes into a *copy* of the ``lossympi`` package under
``out/sanitize/lossympi/``: the installed ``lossympi/_core*.so`` is never written. A run against it puts that
directory first on ``PYTHONPATH`` and preloads the gcc runtimes (``LD_PRELOAD`` of libasan then libubsan, as
CPython itself is not instrumented), with ``ASAN_OPTIONS=detect_leaks=0:abort_on_error=1`` (CPython does not free
everything at exit) and ``PYTHONMALLOC=malloc`` (so that ASan also guards the buffers CPython allocates).

The build is only trusted after two checks: the module's dynamic symbols reference ``__asan_init`` and the
``__ubsan_handle_*`` hooks, and a throwaway canary library compiled with the same flags, loaded into the same
sanitized interpreter, gets a heap overflow and a signed overflow caught (and a clean call passes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "cython_src"
PACKAGE = REPO / "lossympi"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-O1", "-g"]
# as setup.py: extra_compile_args and define_macros
SETUP_FLAGS = ["-fno-strict-aliasing", "-Wno-unused-function", "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION",
               "-D_GNU_SOURCE=1", "-DNDEBUG"]
CYTHON_DIRECTIVES = {"language_level": "3", "boundscheck": "False", "wraparound": "False", "cdivision": "True",
                     "initializedcheck": "False"}
#: What a sanitizer prints when it finds something.
REPORT_PATTERNS = (
    "ERROR: AddressSanitizer", "AddressSanitizer:DEADLYSIGNAL", "runtime error:", "ERROR: LeakSanitizer",
    "SUMMARY: UndefinedBehaviorSanitizer", "SUMMARY: AddressSanitizer",
)

CANARY_C = r"""
#include <limits.h>
#include <stdlib.h>
#include <string.h>
/* Deliberate bugs, to prove that the sanitizers are live in the sanitized interpreter. */
int lm_canary_heap(int n, int i) {
    volatile char *p = malloc(n);  /* size known only at run time: ASan, not UBSan's object-size check */
    memset((char *)p, 0, n);
    p[i] = 1;            /* i >= n: heap-buffer-overflow */
    int v = p[0];
    free((char *)p);
    return v;
}
int lm_canary_signed(int x) {
    volatile int big = INT_MAX;
    return big + x;      /* x > 0: signed integer overflow */
}
"""


def _gcc() -> str | None:
    return shutil.which("gcc")


def runtime_libraries() -> list[str]:
    """Absolute paths of gcc's libasan and libubsan (empty when gcc or either library is missing)."""
    gcc = _gcc()
    if gcc is None:
        return []
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        out = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not out or not os.path.isabs(out) or not os.path.exists(out):
            return []
        libs.append(os.path.realpath(out))
    return libs


def available() -> tuple[bool, str]:
    """Whether a sanitized build can be made here; the reason when not."""
    if _gcc() is None:
        return False, "gcc is not installed (apt-get install gcc)"
    if not runtime_libraries():
        return False, "gcc's libasan/libubsan are missing (apt-get install libasan8 libubsan1, or gcc's full install)"
    try:
        import Cython  # noqa: F401
    except ImportError:
        return False, "Cython is not installed (pip install cython)"
    return True, ""


def _stamp() -> str:
    h = hashlib.sha256()
    for p in sorted(SRC.glob("*.pyx")) + sorted(SRC.glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(SANITIZE_FLAGS + SETUP_FLAGS).encode())
    h.update(json.dumps(CYTHON_DIRECTIVES, sort_keys=True).encode())
    h.update(sys.version.encode())
    for p in sorted(PACKAGE.rglob("*.py")):
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _run(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
    return r


def build(out: Path, *, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the sanitized package copy under ``out`` (reused when sources and flags are unchanged).

    Returns a description of the build: the module path, the commands and the compiler versions.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(f"cannot build a sanitized core: {why}")
    import numpy as np

    out = out.resolve()
    if out == REPO or out == PACKAGE or PACKAGE.resolve().is_relative_to(out):
        raise ValueError(f"{out} would overwrite the installed package: pick a directory such as out/sanitize")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module = out / "lossympi" / f"_core{suffix}"
    stamp = _stamp()
    info_path = out / "build.json"
    if not force and module.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("stamp") == stamp:
            info["reused"] = True
            return info
    log(f"sanitize_build: building {module}")
    if (out / "lossympi").exists():
        shutil.rmtree(out / "lossympi")
    shutil.copytree(PACKAGE, out / "lossympi", ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyc"))
    work = out / "build"
    work.mkdir(parents=True, exist_ok=True)
    c_file = work / "_core.c"
    cython_cmd = [sys.executable, "-m", "cython", "--module-name", "lossympi._core", "-o", str(c_file)]
    for k, v in CYTHON_DIRECTIVES.items():
        cython_cmd += ["-X", f"{k}={v}"]
    cython_cmd.append(str(SRC / "_core.pyx"))
    _run(cython_cmd)
    include = [f"-I{SRC}", f"-I{np.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    gcc_cmd = [_gcc(), "-shared", "-fPIC", *SANITIZE_FLAGS, *SETUP_FLAGS, *include, str(c_file), "-o", str(module)]
    _run(gcc_cmd)
    info = {
        "module": str(module), "stamp": stamp, "reused": False,
        "cython": [Path(cython_cmd[0]).name, *cython_cmd[1:]], "gcc": gcc_cmd,
        "gcc_version": _run([_gcc(), "--version"]).stdout.splitlines()[0],
        "cython_version": _run([sys.executable, "-m", "cython", "--version"]).stdout.strip()
        or _run([sys.executable, "-m", "cython", "--version"]).stderr.strip(),
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def sanitizer_env(out: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a process that runs against the sanitized build in ``out``."""
    env = dict(os.environ if base is None else base)
    libs = runtime_libraries()
    if not libs:
        raise RuntimeError("gcc's libasan/libubsan not found")
    env["LD_PRELOAD"] = ":".join(libs + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1:symbolize=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PYTHONMALLOC"] = "malloc"
    env["PYTHONPATH"] = os.pathsep.join([str(out.resolve())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def find_reports(text: str) -> list[str]:
    """Lines of ``text`` where a sanitizer reported a problem."""
    return [line for line in text.splitlines() if any(p in line for p in REPORT_PATTERNS)]


def verify(out: Path, module: Path) -> dict[str, Any]:
    """Prove that the sanitizers are live: instrumented symbols in ``module``, canaries caught at run time."""
    blob = module.read_bytes()
    result: dict[str, Any] = {
        "asan_instrumented": b"__asan_init" in blob or b"__asan_version_mismatch_check" in blob,
        "ubsan_instrumented": re.search(rb"__ubsan_handle_\w+", blob) is not None,
    }
    env = sanitizer_env(out)
    with tempfile.TemporaryDirectory(prefix="lm-canary-") as tmp:
        src = Path(tmp) / "canary.c"
        lib = Path(tmp) / "canary.so"
        src.write_text(CANARY_C)
        _run([_gcc(), "-shared", "-fPIC", *SANITIZE_FLAGS, str(src), "-o", str(lib)])

        def call(fn: str, args: str) -> tuple[int, list[str]]:
            code = f"import ctypes; ctypes.CDLL({str(lib)!r}).{fn}({args}); print('survived')"
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            return r.returncode, find_reports(r.stderr)

        rc, rep = call("lm_canary_heap", "16, 15")
        result["clean_canary_passes"] = rc == 0 and not rep
        rc, rep = call("lm_canary_heap", "16, 16")
        result["heap_overflow_caught"] = rc != 0 and any("heap-buffer-overflow" in line for line in rep)
        rc, rep = call("lm_canary_signed", "1")
        result["signed_overflow_caught"] = rc != 0 and any("signed integer overflow" in line for line in rep)
    probe = ("import lossympi._core as c, sys; maps = open('/proc/self/maps').read(); "
             "print(c.__file__); print('libasan' in maps, 'libubsan' in maps)")
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())
    lines = r.stdout.split()
    result["loaded_module"] = lines[0] if lines else None
    result["loads_sanitized_module"] = bool(lines) and Path(lines[0]).resolve() == module.resolve()
    result["runtimes_mapped"] = lines[1:3] == ["True", "True"]
    if r.returncode != 0:
        result["probe_error"] = r.stderr[-2000:]
    result["active"] = all(v for k, v in result.items() if isinstance(v, bool))
    return result


def run_sanitized_fuzz(fuzz_args: Sequence[str], out: Path, *, log: Callable[[str], None] = print,
                       timeout: float | None = None) -> dict[str, Any]:
    """Build and verify the sanitized core, run ``tools/fuzz_receive.py fuzz_args`` against it in a subprocess,
    and return the fuzzer's report with a ``sanitizer`` section; ``ok`` is false on any sanitizer report."""
    info = build(out, log=log)
    live = verify(out, Path(info["module"]))
    if not live["active"]:
        raise RuntimeError(f"the sanitizers are not live in the sanitized interpreter: {live}")
    env = sanitizer_env(out)
    with tempfile.TemporaryDirectory(prefix="lm-fuzz-") as tmp:
        json_out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "fuzz_receive.py"), *fuzz_args,
               "--json-out", str(json_out), "--expect-core-dir", str(out.resolve())]
        log(f"sanitize_build: running {' '.join(cmd[1:])}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(REPO))
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise RuntimeError(f"sanitized fuzz run exceeded {timeout} s; stderr tail:\n{stderr[-4000:]}") from None
        reports = find_reports(stderr)
        if json_out.exists():
            report = json.loads(json_out.read_text())
        else:
            report = {"ok": False, "error": "the sanitized run wrote no report (it crashed)"}
    report["sanitizer"] = {
        "build": {k: v for k, v in info.items() if k != "stamp"}, "live_checks": live,
        "env": {k: env[k] for k in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONMALLOC")},
        "exit_code": proc.returncode, "reports": reports[:50],
        "stderr_tail": stderr[-6000:] if (reports or proc.returncode) else "",
    }
    report.setdefault("invariants", {})["no_sanitizer_report"] = not reports
    report["invariants"]["process_survived"] = proc.returncode in (0, 1) and "error" not in report
    report["ok"] = bool(report.get("ok")) and proc.returncode == 0 and not reports
    report["command"] = "python tools/fuzz_receive.py --sanitize " + " ".join(fuzz_args)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "sanitize", help="build directory (out/sanitize)")
    ap.add_argument("--force", action="store_true", help="rebuild even when sources and flags are unchanged")
    args = ap.parse_args(argv)
    ok, why = available()
    if not ok:
        print(f"sanitize_build: {why}", file=sys.stderr)
        return 2
    info = build(args.out, force=args.force)
    live = verify(args.out, Path(info["module"]))
    print(json.dumps({"build": {k: v for k, v in info.items() if k != "stamp"}, "live_checks": live}, indent=2))
    return 0 if live["active"] else 1


if __name__ == "__main__":
    sys.exit(main())
