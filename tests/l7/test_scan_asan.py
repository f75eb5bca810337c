"""The C head scanner (src/poise/l7/_scan.c) under AddressSanitizer and UBSan.

The scanner is built with ``-fsanitize=address,undefined`` into a temporary directory and a
separate Python process (with the sanitizer runtime preloaded) runs the corpus of
tests/l7/scanrig.py through it: every hand-written head, every single-byte change and prefix
of each, and random bytes behind a plain start. Any out-of-bounds read, overflow or other
undefined behaviour stops that process with the sanitizer's report, which fails the test.
(Checked by hand: a scanner changed to read 8 bytes past the end of its input fails it.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.l7.scanrig import compile_scanner
from tests.native import SANITIZE, sanitizer_env, sanitizer_runtime

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import importlib.util, random, sys
sys.path.insert(0, sys.argv[2])
from tests.l7.scanrig import REQUESTS, RESPONSES, mutations
spec = importlib.util.spec_from_file_location("_scan", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
rng = random.Random(7)
corpus = [h for head in (*REQUESTS, *RESPONSES) for h in (head, *mutations(head))]
corpus += [rng.randbytes(rng.randrange(300)) for _ in range(3000)]
corpus += [b"GET / HTTP/1.1\\r\\nHost: a\\r\\n" + rng.randbytes(rng.randrange(64)) + b"\\r\\n\\r\\n"
           for _ in range(3000)]
corpus += [b"HTTP/1.1 200 OK\\r\\nContent-Length: 1\\r\\n" + rng.randbytes(rng.randrange(64))
           for _ in range(3000)]
answered = 0
for data in corpus:
    for args in ((8192, 100, 65536, 0, (b"x-client-subject",)), (4, 2, 40, 3, ())):
        answered += m.scan_request(data, *args) is not None
    answered += m.scan_response(data) is not None
print("scanned", len(corpus), "answered", answered)
"""


@pytest.mark.timeout(300)
def test_the_scanner_is_clean_under_address_and_undefined_behaviour_sanitizers(
    tmp_path: Path,
) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    asan = sanitizer_runtime(cc)
    if asan is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    compile_scanner(tmp_path, SANITIZE)
    built = next(tmp_path.glob("_scan*.so"))
    env = {**sanitizer_env(), "LD_PRELOAD": asan}
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(built), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert "runtime error" not in run.stderr
    assert run.stdout.startswith("scanned "), run.stdout
