"""poise: an HTTP load balancer and service registry."""

from importlib.util import find_spec

__version__ = "0.1.0"
__all__ = ["__version__", "build"]


def build() -> str:
    """How the HTTP hot path is installed: "compiled (mypyc)" or "pure Python" (setup.py)."""
    spec = find_spec("poise.l7.client")
    origin = spec.origin if spec is not None else None
    return "compiled (mypyc)" if origin and not origin.endswith(".py") else "pure Python"
