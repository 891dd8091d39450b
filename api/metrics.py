"""Prometheus metrics of the REST layer (labels bounded by the error-code set)."""

from __future__ import annotations

from prometheus_client import Counter, Info

REST_ERRORS = Counter("sessiond_rest_errors_total", "REST requests answered with an error, by code", ["code"])
# The denominator of the error-ratio alert (deploy/prometheus): API requests (/v1/...) by status class.
REST_REQUESTS = Counter("sessiond_rest_requests_total", "REST API requests answered, by status class", ["status"])
BUILD = Info("sessiond_build", "Version of the running server")

for _status in ("2xx", "4xx", "5xx"):
    REST_REQUESTS.labels(_status)
