"""``dcdeploy web``: the live, read-only page of the fleet (see server.py, docs/web.md)."""

from .server import ListenRefused, WebServer, check_listen, serve

__all__ = ["ListenRefused", "WebServer", "check_listen", "serve"]
