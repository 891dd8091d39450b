"""Prometheus metrics of the REST layer (labels bounded by the error-code set)."""

from __future__ import annotations

from prometheus_client import Counter, Info

REST_ERRORS = Counter("sessiond_rest_errors_total", "REST requests answered with an error, by code", ["code"])
BUILD = Info("sessiond_build", "Version of the running server")
