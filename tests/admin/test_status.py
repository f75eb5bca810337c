"""``poise status --admin``: the forms the admin address may be given in."""

from __future__ import annotations

import pytest

from poise.admin.status import StatusError, admin_url


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:9901", "http://127.0.0.1:9901"),  # as admin.listen is written
        (":9901", "http://127.0.0.1:9901"),
        ("[::1]:9901", "http://[::1]:9901"),
        ("localhost:9901", "http://localhost:9901"),
        ("http://127.0.0.1:9901", "http://127.0.0.1:9901"),
        ("https://admin.example.com", "https://admin.example.com"),
        (" 127.0.0.1:9901 ", "http://127.0.0.1:9901"),
    ],
)
def test_admin_address_forms(given: str, url: str) -> None:
    assert admin_url(given) == url


@pytest.mark.parametrize("given", ["", "ftp://127.0.0.1:9901", "127.0.0.1:9901/v1"])
def test_an_address_that_is_neither_is_refused_by_name(given: str) -> None:
    with pytest.raises(StatusError, match="expected host:port or an http:// URL"):
        admin_url(given)
