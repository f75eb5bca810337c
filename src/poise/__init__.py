"""poise: an HTTP load balancer and service registry."""

from importlib.util import find_spec

__version__ = "0.1.0"
__all__ = ["__version__", "build"]


def build() -> str:
    """How the HTTP hot path is installed (setup.py): "compiled (mypyc, C head scanner)",
    "compiled (mypyc)" or "pure Python", with "C head scanner" when only l7/_scan.c is built."""
    spec = find_spec("poise.l7.client")
    origin = spec.origin if spec is not None else None
    native = find_spec("poise.l7._scan") is not None
    if origin and not origin.endswith(".py"):
        return "compiled (mypyc, C head scanner)" if native else "compiled (mypyc)"
    return "pure Python, C head scanner" if native else "pure Python"
