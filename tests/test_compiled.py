"""The compiled build (setup.py: the HTTP hot path through mypyc) behaves like the source.

``pip install .`` compiles setup.HOT; the rest of the suite runs on the pure-Python
development install. This test builds the compiled modules into a copy of the tree with
setup.py itself and runs the proxy's tests against them, in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the proxy's own tests: every request shape, framing, errors, streaming, upgrades
PROXY_TESTS = [
    "tests/l7",
    "tests/l4",
    "tests/integration/test_l4.py",
    "tests/tls/test_tickets.py",
    "tests/tls/test_engine.py",
    "tests/integration/test_tls.py",
    "tests/wire",
    "tests/h2",
    "tests/blackbox",
    "tests/test_pool.py",
    "tests/test_routing.py",
    "tests/balancing",
    "tests/health",
    "tests/integration/test_proxy.py",
    "tests/integration/test_http_rules.py",
    "tests/integration/test_upstream_responses.py",
    "tests/integration/test_timeouts.py",
    "tests/integration/test_limits_and_forwarding.py",
    "tests/integration/test_upgrade.py",
    "tests/integration/test_access_log.py",
    "tests/integration/test_slow_peers.py",
    "tests/integration/test_workers.py",  # worker processes: the installed build, so the hub
]


@pytest.mark.timeout(1200)
def test_the_compiled_hot_path_passes_the_proxy_tests(tmp_path: Path) -> None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: installs are pure Python here")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("POISE_PURE_PYTHON", "PYTHONPATH")}
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    src = tmp_path / "src"
    for module in ("l7/client", "l7/reader", "l7/upstream", "l7/context", "l7/request", "l7/_scan",
                   "l4/relay", "l4/_pump", "tls/_tickets", "tls/_engine", "tls/transport",
                   "tls/gate", "wire/_hub"):  # fmt: skip
        assert list((src / "poise").glob(f"{module}.*.so")), f"{module} was not compiled"
    env["PYTHONPATH"] = str(src)
    which = subprocess.run(
        [sys.executable, "-c", "import poise; print(poise.build())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert which.stdout.strip() == "compiled (mypyc, C head scanner)", which.stdout + which.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *PROXY_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout
