"""TLS served by sessiond itself (SESSIOND_TLS_CERT_FILE / SESSIOND_TLS_KEY_FILE): TLS 1.3 only, on both ports.

For deployments without a gateway; usually nginx terminates TLS (deploy/nginx). The certificate is loaded once at
start, so an unreadable or mismatched file stops the start with a message naming it instead of failing every
handshake later. A renewed certificate takes effect at the next (rolling) restart.
"""

from __future__ import annotations

import ssl

from hypercorn.config import Config as HypercornConfig

from api.settings import Settings, SettingsError

# What the REST port offers (hypercorn speaks both); the WebSocket port speaks HTTP/1.1 only (trio-websocket).
REST_ALPN = ("h2", "http/1.1")
WS_ALPN = ("http/1.1",)


def server_ssl_context(settings: Settings, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
    """A server context refusing anything below TLS 1.3, or None when TLS is not configured."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(list(alpn))
    try:
        context.load_cert_chain(certfile=settings.tls_cert_file, keyfile=settings.tls_key_file)
    except OSError as exc:  # missing or unreadable; ssl.SSLError (also an OSError) when the PEM is bad or mismatched
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise SettingsError(
            f"SESSIOND_TLS_CERT_FILE={settings.tls_cert_file} / SESSIOND_TLS_KEY_FILE={settings.tls_key_file}: "
            f"cannot load the certificate and key ({reason})"
        ) from exc
    return context


class TlsHypercornConfig(HypercornConfig):
    """hypercorn's Config builds its own context with TLS 1.2 as the minimum: this one hands it ours instead."""

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._ssl_context = ssl_context
        if ssl_context is not None:  # hypercorn opens TLS listeners when both are set (`ssl_enabled`)
            self.certfile = settings.tls_cert_file
            self.keyfile = settings.tls_key_file

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context
