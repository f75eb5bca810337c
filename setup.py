"""Build: the HTTP hot path compiled with mypyc, and the head scanner in C
(src/poise/l7/_scan.c, the twin of src/poise/l7/scan.py), when a C compiler is at hand; pure
Python otherwise (same source, same behaviour; compiled, a proxied request costs 17% less CPU,
see bench/results/mypyc-latest.md, and heads that differ cost less again, bench/README.md).

* ``pip install .`` compiles ``HOT`` (about a minute); without a working C compiler or mypyc
  it says so and installs the pure-Python package.
* ``pip install -e .`` (development) stays pure Python, so an edit takes effect at once;
  ``POISE_COMPILE=1`` compiles there too (then rebuild after editing a compiled module).
* ``POISE_PURE_PYTHON=1`` never compiles.

``poise --version`` says which one is installed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
import tempfile
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# the modules every proxied request runs through (tests/test_compiled.py runs the proxy's
# tests against this build)
HOT = [
    "src/poise/l7/client.py",
    "src/poise/l7/reader.py",
    "src/poise/l7/memo.py",
    "src/poise/l7/attempts.py",
    "src/poise/l7/upstream.py",
    "src/poise/l7/response.py",
    "src/poise/l7/verdicts.py",
    "src/poise/failures.py",
    "src/poise/l7/context.py",
    "src/poise/l7/request.py",
    "src/poise/l7/http.py",
    "src/poise/l7/retry.py",
    "src/poise/upstream/pool.py",
    "src/poise/upstream/limits.py",
    "src/poise/routing.py",
    "src/poise/selection.py",
    "src/poise/models.py",
    "src/poise/health/passive.py",
    "src/poise/health/status.py",
    "src/poise/accesslog.py",
    "src/poise/l4/relay.py",
    "src/poise/tls/transport.py",
    "src/poise/tls/engine.py",
    "src/poise/tls/gate.py",
    # HTTP/2 streams are client connections to the request path (H2Stream subclasses
    # ClientConnection, so it must be compiled with it)
    "src/poise/h2/front.py",
    "src/poise/h2/upstream.py",  # (MuxStream subclasses UpstreamConnection)
    *(
        f"src/poise/balancing/{name}.py"
        for name in (
            "base", "consistent", "hashing", "keys", "load", "loadaware", "names",
            "round_robin", "simple", "sticky",
        )
    ),
]  # fmt: skip


def _say(message: str) -> None:
    print(f"poise build: {message}", file=sys.stderr)


def _wanted() -> bool:
    if os.environ.get("POISE_PURE_PYTHON"):
        _say("POISE_PURE_PYTHON is set: pure Python")
        return False
    # development installs stay pure Python, so an edit takes effect without a rebuild
    editable = any(arg in ("editable_wheel", "develop") for arg in sys.argv)
    return not editable or bool(os.environ.get("POISE_COMPILE"))


def _compiler_works() -> bool:
    """Can a C extension be built here (a compiler, and Python's headers)?"""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint poise_probe(void) { return 0; }\n")
        try:
            cc.compile([source], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]])
        except Exception as exc:  # any failure means: no compiled build
            _say(f"no working C compiler ({exc}): pure Python")
            return False
    return True


def _extensions() -> list[Any]:
    if not _wanted() or not _compiler_works():
        return []
    native = [
        Extension("poise.l7._scan", ["src/poise/l7/_scan.c"], extra_compile_args=["-O2"]),
        # the TLS ticket key callback: libssl is looked up at run time (dlopen), not linked
        Extension(
            "poise.tls._tickets",
            ["src/poise/tls/_tickets.c"],
            depends=["src/poise/tls/_libssl.h"],
            extra_compile_args=["-O2"],
        ),
        # the L4 relay's byte pump (its twin: the relay's protocols in l4/relay.py)
        Extension("poise.l4._pump", ["src/poise/l4/_pump.c"], extra_compile_args=["-O2"]),
        # plain listeners' client connections (its twin: the event loop's transports)
        Extension("poise.wire._hub", ["src/poise/wire/_hub.c"], extra_compile_args=["-O2"]),
        # HTTPS listeners' TLS record engine (its twin: engine.PyEngine), libssl as above
        Extension(
            "poise.tls._engine",
            ["src/poise/tls/_engine.c"],
            depends=["src/poise/tls/_libssl.h"],
            extra_compile_args=["-O2"],
        ),
    ]
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not available: the head scanner only")
        return native
    _say(f"compiling the head scanner (src/poise/l7/_scan.c) and {len(HOT)} hot-path modules")
    try:
        # imports outside the compiled set are type-checked from their sources; third-party
        # packages are not installed in the build environment
        modules = mypycify(
            ["--ignore-missing-imports", *HOT], opt_level="3", debug_level="0", group_name="poise"
        )
    except (Exception, SystemExit) as exc:  # e.g. a newer mypy with a new complaint
        _say(f"mypyc could not translate the modules ({exc!r}): the head scanner only")
        return native
    return [*native, *modules]


class OptionalBuildExt(build_ext):
    """A C compiler that fails (another version, another warning under -Werror) leaves the
    pure-Python package, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            _say(f"compiling failed ({exc}): pure Python")
            for ext in self.extensions:
                with contextlib.suppress(OSError):
                    os.remove(self.get_ext_fullpath(ext.name))
            self.extensions = []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
