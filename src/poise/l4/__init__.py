"""L4: TCP listeners relaying bytes to backends chosen by the same policies and health as
HTTP (``listener``), the relay itself (``relay``) and the PROXY protocol (``proxy_protocol``)."""

from poise.l4.listener import L4, TcpListener

__all__ = ["L4", "TcpListener"]
