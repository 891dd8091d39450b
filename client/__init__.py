"""Python client SDK for sessiond's WebSocket protocol v1 (DESIGN §3): `open_session` and its value types."""

from client.sdk import Session, open_session
from client.wire import FINAL_CLOSE_CODES, SUBPROTOCOLS, Patch, SessionError, backoff_delay

__all__ = ["FINAL_CLOSE_CODES", "SUBPROTOCOLS", "Patch", "Session", "SessionError", "backoff_delay", "open_session"]
