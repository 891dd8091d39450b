"""The composition root: builds every part from Settings and runs them in one trio nursery.

Only this module knows the concrete storage backends. Shutdown (SIGTERM/SIGINT or `stop()`) is the drain of
DESIGN §6: /readyz turns 503 and the cluster stops placing sessions here, WebSockets are no longer accepted, every
actor checkpoints, closes its devices (1001 here, 1013 on other pods) and releases its lease, the pod leaves the
member list, the remaining connections close with 1001, REST stops, exit 0.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio
from hypercorn.trio import serve as hypercorn_serve

from actors.config import ActorConfig
from actors.leases import LeaseKeeper
from actors.registry import Registry
from actors.router import Router
from api.app import create_app
from api.auth import Authenticator
from api.settings import Settings
from api.tls import REST_ALPN, WS_ALPN, TlsHypercornConfig, server_ssl_context
from protocol import codes
from storage.ports import Storage, StorageUnavailable
from transport.server import WebSocketServer, WsConfig

log = structlog.get_logger("sessiond.server")
STORAGE_SWITCH_INTERVAL_S = 0.0005
GC_GEN0_THRESHOLD = 20_000


def actor_config(settings: Settings) -> ActorConfig:
    return ActorConfig(
        mailbox_size=settings.mailbox_size,
        replay_window=settings.replay_window,
        max_state_bytes=settings.max_state_bytes,
        passivate_after_s=settings.passivate_after_s,
        memory_budget_bytes=settings.memory_budget_bytes,
        checkpoint_every_versions=settings.checkpoint_every_versions,
        checkpoint_every_s=settings.checkpoint_every_s,
        fast_snapshot_every_versions=settings.snapshot_every_versions if settings.redis_url else None,
        durable_handoffs=settings.durability == "postgres",
        max_restarts=settings.max_restarts,
        restart_window_s=settings.restart_window_s,
        max_devices=settings.max_devices_per_session,
        hot_actors=settings.hot_actors,
    )


def ws_config(settings: Settings) -> WsConfig:
    return WsConfig(
        host=settings.host,
        port=settings.ws_port,
        allowed_origins=settings.allowed_origins,
        max_frame_bytes=settings.max_frame_bytes,
        rate_per_s=settings.rate_per_s,
        rate_burst=settings.rate_burst,
        hello_timeout_s=settings.hello_timeout_s,
        ping_interval_s=settings.ping_interval_s,
        idle_timeout_s=settings.idle_timeout_s,
        send_queue_frames=settings.send_queue_frames,
        send_queue_bytes=settings.send_queue_bytes,
        fast_path=settings.ws_fast_path,
        read_hub=settings.ws_read_hub,
        max_connections_per_user=settings.max_connections_per_user,
    )


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The embedded SQLite default, or the production services when they are configured."""
    # Storage threads (the asyncio bridge, the SQLite worker) need the GIL promptly while the trio thread is
    # busy; the default 5 ms switch interval would add up to 5 ms to every storage round trip under load.
    sys.setswitchinterval(min(sys.getswitchinterval(), STORAGE_SWITCH_INTERVAL_S))
    # Without any service this is the SQLite file, the in-process journal and a snapshot layer in memory over the
    # file (a handoff's snapshot, DESIGN §5.2): storage.production assembles that too, one path for every mode.
    from storage.production import open_production_storage

    async with open_production_storage(settings, key_prefix=settings.redis_prefix) as storage:
        yield storage


@dataclass
class RunningServer:
    """What `serve` reports once it listens: the bound ports, and a way to stop it."""

    http_port: int
    ws_port: int
    registry: Registry
    storage: Storage
    router: Router
    stop_event: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        self.stop_event.set()


class _SeenUsers:
    """Records a JWT subject on first sight, remembering a bounded set to avoid a write per connect."""

    def __init__(self, storage: Storage, limit: int = 100_000) -> None:
        self._storage = storage
        self._seen: dict[str, None] = {}
        self._limit = limit

    async def __call__(self, sub: str) -> None:
        if sub in self._seen:
            return
        try:
            await self._storage.sessions.record_user(sub)
        except StorageUnavailable as exc:  # best effort: a device is not refused for it; retried next connect
            log.warning("could not record user", error=str(exc))
            return
        self._seen[sub] = None
        if len(self._seen) > self._limit:
            self._seen.pop(next(iter(self._seen)))


async def serve(
    settings: Settings,
    authenticator: Authenticator,
    *,
    handle_signals: bool = True,
    tune_gc: bool = True,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run everything until SIGTERM/SIGINT (or `RunningServer.stop()`).

    `tune_gc` freezes start-up objects out of the cyclic GC's reach: right for the server process, not for a
    test process that starts many servers.
    """
    structlog.contextvars.bind_contextvars(pod=settings.pod_id)
    # Loaded before anything opens: a bad certificate or key stops the start with a SettingsError naming it.
    rest_tls = server_ssl_context(settings, REST_ALPN)
    ws_tls = server_ssl_context(settings, WS_ALPN)
    async with open_storage(settings) as storage:
        assert storage.leases is not None
        leases = LeaseKeeper(storage.leases, storage.sessions, settings.pod_id, settings.lease_ttl_s)
        registry = Registry(storage, actor_config(settings), leases)
        router = Router(
            settings.pod_id, registry, storage, leases, ttl_s=settings.lease_ttl_s,
            ask_timeout_s=settings.request_timeout_s,
        )
        ws = WebSocketServer(
            ws_config(settings), router, authenticator, on_user=_SeenUsers(storage), ssl_context=ws_tls
        )
        app = create_app(settings, router, authenticator, storage)
        hconfig = TlsHypercornConfig(settings, rest_tls)  # HTTPS (TLS 1.3 only) when rest_tls is set
        hconfig.ssl_handshake_timeout = settings.hello_timeout_s  # a silent TLS client is cut like a silent hello
        hconfig.bind = [f"{settings.host}:{settings.http_port}"]
        hconfig.graceful_timeout = 2
        hconfig.read_timeout = settings.http_read_timeout_s  # type: ignore[assignment]  # a float works (trio)
        # A connection that never sends a request is cut by hypercorn's keep-alive timer, not the read timeout.
        hconfig.keep_alive_timeout = min(hconfig.keep_alive_timeout, settings.http_read_timeout_s)
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        hconfig.accesslog = None
        http_stop = trio.Event()
        async with trio.open_nursery() as root:
            await root.start(registry.run)
            await root.start(router.run)  # joins the cluster; refuses (ClusterConflict) to share an embedded store
            ws_port = await root.start(ws.run)
            app.config["SESSIOND_WS_PORT"] = ws_port  # /app/config.json tells the web app where the WebSocket is
            binds = await root.start(partial(hypercorn_serve, app, hconfig, shutdown_trigger=http_stop.wait))
            http_port = int(binds[0].rsplit(":", 1)[1])
            running = RunningServer(http_port, ws_port, registry, storage, router)
            if handle_signals:
                root.start_soon(_watch_signals, running.stop_event)
            if tune_gc:
                _tune_gc()
            log.info(
                "sessiond listening", http_port=http_port, ws_port=ws_port, data_dir=str(settings.data_dir),
                tls=rest_tls is not None,
            )
            task_status.started(running)
            await running.stop_event.wait()
            log.info("shutting down: handing sessions over")
            ws.stop_accepting()
            await router.drain(settings.shutdown_grace_s)
            ws.close_all(codes.GOING_AWAY, "server shutting down")
            with trio.move_on_after(3):
                await ws.wait_all_closed()
            http_stop.set()
            root.cancel_scope.cancel()
    log.info("sessiond stopped")


def _tune_gc() -> None:
    """Keep the cyclic GC from pausing the event loop: what start-up allocated is frozen out of its reach,
    and young collections run less often (the hot path allocates many short-lived, acyclic dicts)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal received", signal=signal.Signals(signum).name)
            stop.set()
            return
