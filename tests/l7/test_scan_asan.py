"""The C head scanner (src/poise/l7/_scan.c) under AddressSanitizer and UBSan.

The scanner is built with ``-fsanitize=address,undefined`` into a temporary directory and a
separate Python process (with the sanitizer runtime preloaded) runs the corpus of
tests/l7/scanrig.py through it: every hand-written head, every single-byte change and prefix
of each, and random bytes behind a plain start. Any out-of-bounds read, overflow or other
undefined behaviour stops that process with the sanitizer's report, which fails the test.
(Checked by hand: a scanner changed to read 8 bytes past the end of its input fails it.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.l7.scanrig import SOURCE
from tests.native import run_sanitized

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
    out = run_sanitized(SOURCE, tmp_path, DRIVER)
    assert out.startswith("scanned "), out
