"""Prometheus metrics of the WebSocket transport (bounded labels only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTIONS = Gauge("sessiond_ws_connections", "Open device WebSocket connections")
CONNECTS = Counter("sessiond_ws_connects_total", "WebSocket handshakes, by outcome", ["outcome"])
FRAMES_IN = Counter("sessiond_ws_frames_in_total", "Frames received from devices")
FRAMES_OUT = Counter("sessiond_ws_frames_out_total", "Frames sent to devices")
MESSAGES_OUT = Counter("sessiond_ws_messages_out_total", "WebSocket messages sent (a message may batch frames)")
ERRORS = Counter("sessiond_ws_errors_total", "Error frames sent to devices, by code", ["code"])
CLOSES = Counter("sessiond_ws_closes_total", "Connections closed by the server, by close code", ["code"])
