"""Build one of poise's C modules from its source for a test, without setup.py: the twins'
tests run the C side even in the development install, which is pure Python."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "poise"


def compile_extension(source: Path, directory: Path, flags: list[str]) -> ModuleType | None:
    """Compile ``source`` (warnings are errors) into ``directory`` and load it; None without
    a C compiler, or with ``flags`` (a sanitizer build is loaded by its own process)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None
    name = source.stem
    target = directory / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", *flags,
         f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    if flags:
        return None
    spec = importlib.util.spec_from_file_location(name, target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ONCE: dict[Path, ModuleType | None] = {}


def c_or_twin(request: pytest.FixtureRequest, source: Path, installed: ModuleType | None) -> Any:
    """For a fixture with params ["C", "python"]: the C module to run the test with (the
    installed one when ``pip install .`` built it, else ``source`` compiled once per
    session; the test is skipped without a C compiler), or None for the twin."""
    if request.param != "C":
        return None
    if installed is not None:
        return installed
    if source not in _ONCE:
        directory = request.getfixturevalue("tmp_path_factory").mktemp(source.stem)
        _ONCE[source] = compile_extension(source, directory, [])
    if _ONCE[source] is None:
        pytest.skip("no C compiler: the twin only")
    return _ONCE[source]


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
            "-g", "-O1"]  # fmt: skip


def sanitizer_runtime(cc: str, name: str = "libasan.so") -> str | None:
    """The compiler's sanitizer runtime library (to preload into a Python process), or None."""
    found = subprocess.run(
        [cc, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    return found if found and os.path.isabs(found) and os.path.exists(found) else None


def sanitizer_env() -> dict[str, str]:
    """The environment of a process that loads a sanitized module (``LD_PRELOAD`` is added by
    the caller): reports stop it with an exit code; Python's own allocations are not looked
    at for leaks; every object its own ``malloc`` block, so the sanitizer sees its bounds
    (Python's small-object allocator would hide a read past an end inside its arena)."""
    return {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=66",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=67",
        "PYTHONMALLOC": "malloc",
    }


def run_sanitized(source: Path, directory: Path, driver: str) -> str:
    """Build ``source`` with AddressSanitizer and UBSan into ``directory`` and run ``driver``
    (Python code; ``sys.argv[1]`` is the built module's path, ``sys.argv[2]`` the
    repository) in a process with the sanitizer runtime preloaded. Fails the test on any
    report or a non-zero exit; skips it without a compiler or runtime. Returns its output."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    asan = sanitizer_runtime(cc)
    if asan is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    compile_extension(source, directory, SANITIZE)
    built = next(directory.glob(f"{source.stem}*.so"))
    run = subprocess.run(
        [sys.executable, "-c", driver, str(built), str(SRC.parents[1])],
        env={**sanitizer_env(), "LD_PRELOAD": asan}, capture_output=True, text=True,
        timeout=240, check=False, cwd=directory,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert "runtime error" not in run.stderr
    return run.stdout
