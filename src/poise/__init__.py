"""poise: an HTTP load balancer and service registry."""

__version__ = "0.1.0"
__all__ = ["__version__"]
