# The C twin of poise.l7.scan (src/poise/l7/_scan.c); see scan.py for what these answer.
def scan_request(
    data: bytes,
    max_target: int,
    max_headers: int,
    max_header_bytes: int,
    max_body: int,
    drop: tuple[bytes, ...],
    /,
) -> tuple[bytes, bytes, bytes, bytes, bool, bytes | None, int] | None: ...
def scan_response(data: bytes, /) -> tuple[int, bytes, int, int, bool] | None: ...
