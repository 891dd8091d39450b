"""transport/readhub.py: one task calls each readable socket's callback, level-triggered, over real sockets."""

from __future__ import annotations

import socket

import trio

from transport.readhub import MAX_EVENTS, ReadHub


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.001)


async def test_a_socket_not_drained_is_called_again_until_it_is(nursery: trio.Nursery) -> None:
    hub = ReadHub()
    nursery.start_soon(hub.run)
    ours, peer = pair()
    got: list[bytes] = []

    def one_byte() -> None:  # takes one byte per call: level-triggered, the rest is reported again
        got.append(ours.recv(1))

    hub.add(ours.fileno(), one_byte)
    peer.send(b"hello")
    await wait_for(lambda: b"".join(got) == b"hello")
    assert len(got) == 5
    # Drained, it is not called again: a call with nothing to read would raise BlockingIOError, the hub would drop
    # the callback, and this byte would never be read.
    peer.send(b"!")
    await wait_for(lambda: b"".join(got) == b"hello!")
    hub.remove(ours.fileno(), one_byte)
    assert len(hub) == 0
    ours.close()
    peer.close()


async def test_more_ready_sockets_than_one_round_takes_are_all_served(nursery: trio.Nursery) -> None:
    hub = ReadHub()
    nursery.start_soon(hub.run)
    pairs = [pair() for _ in range(MAX_EVENTS * 2 + 7)]
    served: set[int] = set()
    for i, (ours, _) in enumerate(pairs):

        def read(i: int = i, ours: socket.socket = ours) -> None:
            ours.recv(100)
            served.add(i)

        hub.add(ours.fileno(), read)
    for _, peer in pairs:
        peer.send(b"x")
    await wait_for(lambda: len(served) == len(pairs))
    for ours, peer in pairs:
        ours.close()
        peer.close()


async def test_removing_with_a_stale_callback_keeps_the_new_owner_of_a_reused_descriptor(nursery: trio.Nursery) -> None:
    """A socket closed without `remove`, its number reused by a new one: the old connection's late `remove`
    must not unregister the new connection."""
    hub = ReadHub()
    nursery.start_soon(hub.run)
    ours, peer = pair()
    fd = ours.fileno()
    hub.add(fd, lambda: None)
    old_callback = hub._callbacks[fd]
    ours.close()
    peer.close()
    new, new_peer = pair()
    assert new.fileno() == fd  # the lowest free number comes back
    got: list[bytes] = []
    hub.add(fd, lambda: got.append(new.recv(10)))
    hub.remove(fd, old_callback)
    new_peer.send(b"ok")
    await wait_for(lambda: got == [b"ok"])
    new.close()
    new_peer.close()


async def test_a_callback_that_raises_is_dropped_and_the_others_go_on(nursery: trio.Nursery) -> None:
    hub = ReadHub()
    nursery.start_soon(hub.run)
    (bad, bad_peer), (good, good_peer) = pair(), pair()

    def broken() -> None:
        raise RuntimeError("bug")

    got: list[bytes] = []
    hub.add(bad.fileno(), broken)
    hub.add(good.fileno(), lambda: got.append(good.recv(10)))
    bad_peer.send(b"boom")
    good_peer.send(b"one")
    await wait_for(lambda: got == [b"one"] and len(hub) == 1)
    good_peer.send(b"two")
    await wait_for(lambda: got == [b"one", b"two"])
    for s in (bad, bad_peer, good, good_peer):
        s.close()
