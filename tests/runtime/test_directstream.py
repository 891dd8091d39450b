"""runtime/directstream.py over real loopback TCP: partial writes, the EAGAIN fallback, order with send_all."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from runtime.directstream import DirectStream
from transport.wsframe import data_frame


async def tcp_pair(small_buffers: bool = True) -> tuple[DirectStream, trio.SocketStream]:
    """(server side as a DirectStream, client side), with buffers small enough that a write fills them."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    if small_buffers:
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the receiver's window stays wide:
    return DirectStream(server), client


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(65536)
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def test_a_write_the_kernel_cannot_take_whole_is_kept_and_drained_in_order() -> None:
    direct, client = await tcp_pair()
    payload = os.urandom(1 << 20)  # more than the buffers hold (a tiny receive window would be slow)
    direct.write_nowait(payload)  # no await: what the kernel takes now, the rest is kept
    assert 0 < direct.pending_bytes < len(payload), "1 MiB went whole into the socket buffers"
    direct.write_nowait(b"tail")  # behind the remainder, never before it
    assert direct.pending_bytes > 4
    got: list[bytes] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(direct.drain)
            got.append(await read_exactly(client, len(payload) + 4))
    assert got[0] == payload + b"tail"
    assert direct.pending_bytes == 0
    direct.shrink()  # an idle device gives the emptied buffer back; writing again still works
    assert direct._pending == ()
    direct.write_nowait(b"again")
    assert await read_exactly(client, 5) == b"again"
    await direct.aclose()
    await client.aclose()


async def test_send_all_from_another_task_keeps_its_place_between_fast_writes() -> None:
    """trio-websocket's pongs and close frames (send_all) and our frames (write_nowait) share one byte order."""
    direct, client = await tcp_pair()
    first = os.urandom(1 << 20)
    direct.write_nowait(first)
    assert direct.pending_bytes
    sent = trio.Event()

    async def pong() -> None:
        await direct.send_all(b"PONG")  # waits until everything before it and itself is with the kernel
        sent.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pong)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            direct.write_nowait(b"after")  # queued behind the pong
            got = await read_exactly(client, len(first) + 9)
            nursery.start_soon(direct.drain)
    assert got == first + b"PONG" + b"after"
    assert sent.is_set()
    await direct.aclose()
    await client.aclose()


async def test_small_writes_go_straight_to_the_kernel() -> None:
    direct, client = await tcp_pair(small_buffers=False)
    for n in range(100):
        direct.write_nowait(data_frame(b'{"n":%d}' % n, binary=False))
        assert direct.pending_bytes == 0  # nothing kept: no task needed
    expected = b"".join(data_frame(b'{"n":%d}' % n, binary=False) for n in range(100))
    with trio.fail_after(5):
        assert await read_exactly(client, len(expected)) == expected
    await direct.aclose()
    await client.aclose()


async def test_a_peer_that_is_gone_breaks_the_stream_instead_of_raising_oserror() -> None:
    direct, client = await tcp_pair(small_buffers=False)
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await client.aclose()  # linger 0: a reset
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        while True:
            direct.write_nowait(b"x" * 1000)
            await trio.sleep(0.01)
    assert not direct.usable
    with pytest.raises(trio.BrokenResourceError):
        await direct.drain()
    await direct.aclose()


async def test_after_aclose_nothing_is_written_to_the_descriptor() -> None:
    """Once closed, the fd number may belong to another connection: a late write must fail, not land there."""
    direct, client = await tcp_pair()
    direct.write_nowait(os.urandom(1 << 20))
    assert direct.pending_bytes
    await direct.aclose()
    assert direct.pending_bytes == 0
    with pytest.raises(trio.ClosedResourceError):
        direct.write_nowait(b"late")
    await client.aclose()


async def test_drain_is_a_checkpoint_even_with_nothing_pending() -> None:
    direct, client = await tcp_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await direct.drain()
    assert scope.cancelled_caught
    await direct.aclose()
    await client.aclose()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_data_frames_match_wsproto(size: int) -> None:
    from wsproto.connection import ConnectionType
    from wsproto.frame_protocol import FrameProtocol

    payload = os.urandom(size)
    ours_binary = data_frame(payload, binary=True)
    reference = FrameProtocol(client=False, extensions=[]).send_data(payload, fin=True)
    assert ours_binary == reference
    text = ("é" * (size // 2)).encode()
    assert data_frame(text, binary=False) == FrameProtocol(client=False, extensions=[]).send_data(
        text.decode(), fin=True
    )
    assert ConnectionType.SERVER  # the side whose frames are unmasked
