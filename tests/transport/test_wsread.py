"""transport/wsread.py, the sans-I/O frame reader, against frames built by wsproto's client side (and by hand for
what wsproto will not send): round trips, every way of splitting a stream, each violation's close code, and
random valid streams compared with wsproto's own server-side parser."""

from __future__ import annotations

import random
import struct

import pytest
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from transport.wsread import CloseFrame, Event, FrameReader, PingFrame, PongFrame, WsViolation

BIG = 1 << 20


def client() -> FrameProtocol:
    """A wsproto client: every frame it serializes is masked, with a fresh random key."""
    return FrameProtocol(client=True, extensions=[])


def raw(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    width: int | None = None,
    mask: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """A frame as the peer may really send it, legal or not: `length` overrides the header's payload length,
    `width` forces its encoding (7, 16 or 64 bits)."""
    size = len(payload) if length is None else length
    if width is None:
        width = 7 if size < 126 else 16 if size < 0x10000 else 64
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    flag = 0x80 if masked else 0
    if width == 7:
        head += bytes([flag | size])
    elif width == 16:
        head += bytes([flag | 126]) + struct.pack("!H", size)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def text_of(size: int) -> str:
    """A string whose UTF-8 is exactly `size` bytes, mostly two-byte characters (a split one is invalid)."""
    return "é" * (size // 2) + "x" * (size % 2)


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += reader.feed(chunk)
    return events


def random_chunks(data: bytes, rng: random.Random, most: int = 64) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, most)
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


def violation(reader: FrameReader, data: bytes) -> WsViolation:
    with pytest.raises(WsViolation) as caught:
        reader.feed(data)
    return caught.value


# ---- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 125, 126, 127, 511, 512, 513, 65535, 65536, 200000])
def test_text_round_trip(size: int) -> None:
    text = text_of(size)
    frame = bytes(client().send_data(text))
    assert FrameReader(BIG).feed(frame) == [text]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 125, 126, 127, 511, 512, 513, 65535, 65536, 200000])
def test_binary_round_trip(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    frame = bytes(client().send_data(payload))
    (event,) = FrameReader(BIG).feed(frame)
    assert type(event) is bytes
    assert event == payload


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 6, 7, 8, 60, 123, 124, 125])
def test_small_frames_with_every_mask_alignment(size: int) -> None:
    """The one-frame path and the general path (the same frame after a ping) unmask alike for every length."""
    rng = random.Random(size)
    for _ in range(20):
        mask = rng.randbytes(4)
        payload = rng.randbytes(size)
        frame = raw(0x2, payload, mask=mask)
        ping = raw(0x9, b"p", mask=mask)
        assert FrameReader(BIG).feed(frame) == [payload]
        assert FrameReader(BIG).feed(ping + frame) == [PingFrame(b"p"), payload]
        assert FrameReader(BIG).feed(frame + ping) == [payload, PingFrame(b"p")]


def test_zero_mask_and_all_ones_mask() -> None:
    payload = bytes(range(256)) * 3
    for mask in (b"\0\0\0\0", b"\xff\xff\xff\xff"):
        for size in (0, 5, 125, 300, 768):
            assert FrameReader(BIG).feed(raw(0x2, payload[:size], mask=mask)) == [payload[:size]]


def test_control_frames() -> None:
    peer = client()
    data = bytes(peer.ping(b"")) + bytes(peer.ping(b"x" * 125)) + bytes(peer.pong(b"pong")) + bytes(peer.pong())
    assert FrameReader(BIG).feed(data) == [PingFrame(b""), PingFrame(b"x" * 125), PongFrame(b"pong"), PongFrame(b"")]


def test_close_frames() -> None:
    assert FrameReader(BIG).feed(bytes(client().close())) == [CloseFrame(None, "")]
    assert FrameReader(BIG).feed(bytes(client().close(1000))) == [CloseFrame(1000, "")]
    assert FrameReader(BIG).feed(bytes(client().close(4000, "bye ünïcode"))) == [CloseFrame(4000, "bye ünïcode")]
    assert FrameReader(BIG).feed(raw(0x8, struct.pack("!H", 1001) + "é".encode() * 61 + b"x")) == [
        CloseFrame(1001, "é" * 61 + "x")
    ]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    assert FrameReader(BIG).feed(raw(0x8, struct.pack("!H", code) + b"why")) == [CloseFrame(code, "why")]


def test_several_frames_in_one_feed() -> None:
    peer = client()
    data = b"".join(
        bytes(frame)
        for frame in (peer.send_data("one"), peer.send_data(b"two"), peer.ping(b"3"), peer.send_data(text_of(300)))
    )
    assert FrameReader(BIG).feed(data) == ["one", b"two", PingFrame(b"3"), text_of(300)]


def test_a_partial_frame_after_whole_ones_is_kept() -> None:
    peer = client()
    first, second = bytes(peer.send_data("first")), bytes(peer.send_data("second" * 50))
    reader = FrameReader(BIG)
    assert reader.feed(first + second[:7]) == ["first"]
    assert reader.feed(second[7:-1]) == []
    assert reader.feed(second[-1:]) == ["second" * 50]
    assert reader.feed(first) == ["first"]  # and the one-frame path is back once nothing is left over


def test_empty_feed() -> None:
    reader = FrameReader(BIG)
    assert reader.feed(b"") == []
    frame = bytes(client().send_data("hi"))
    assert reader.feed(frame[:3]) == []
    assert reader.feed(b"") == []
    assert reader.feed(frame[3:]) == ["hi"]


# ---- fragmentation -------------------------------------------------------------------------------------------


def test_fragmented_text_with_pings_between_fragments() -> None:
    peer = client()
    text = text_of(1000)
    data = (
        bytes(peer.send_data(text[:100], fin=False))
        + bytes(peer.ping(b"a"))
        + bytes(peer.send_data(text[100:400], fin=False))
        + bytes(peer.pong(b"b"))
        + bytes(peer.ping(b"c"))
        + bytes(peer.send_data("", fin=False))
        + bytes(peer.send_data(text[400:], fin=True))
        + bytes(peer.send_data("after"))
    )
    assert FrameReader(BIG).feed(data) == [PingFrame(b"a"), PongFrame(b"b"), PingFrame(b"c"), text, "after"]


def test_control_frames_come_out_before_the_message_completes() -> None:
    peer = client()
    reader = FrameReader(BIG)
    assert reader.feed(bytes(peer.send_data(b"abc", fin=False))) == []
    assert reader.feed(bytes(peer.ping(b"now"))) == [PingFrame(b"now")]
    assert reader.feed(bytes(peer.send_data(b"def", fin=False))) == []
    assert reader.feed(bytes(peer.pong(b"then"))) == [PongFrame(b"then")]
    assert reader.feed(bytes(peer.send_data(b"ghi", fin=True))) == [b"abcdefghi"]


def test_a_multibyte_character_split_between_fragments() -> None:
    encoded = "añb€c😀".encode()
    data = b"".join(
        raw(0x1 if i == 0 else 0x0, encoded[i : i + 1], fin=i == len(encoded) - 1) for i in range(len(encoded))
    )
    assert FrameReader(BIG).feed(data) == ["añb€c😀"]


def test_fragmented_binary_with_big_fragments() -> None:
    peer = client()
    payload = random.Random(7).randbytes(150000)
    frames = [
        bytes(peer.send_data(payload[:70000], fin=False)),
        bytes(peer.send_data(payload[70000:70001], fin=False)),
        bytes(peer.ping(b"")),
        bytes(peer.send_data(payload[70001:], fin=True)),
    ]
    events = feed_all(FrameReader(BIG), random_chunks(b"".join(frames), random.Random(1), most=9000))
    assert events == [PingFrame(b""), payload]


def test_a_close_frame_between_fragments_ends_the_stream() -> None:
    peer = client()
    data = bytes(peer.send_data("part", fin=False)) + bytes(peer.close(1001, "gone")) + bytes(peer.send_data("x"))
    reader = FrameReader(BIG)
    assert reader.feed(data) == [CloseFrame(1001, "gone")]
    assert reader.feed(bytes(client().send_data("more"))) == []


# ---- every way of splitting a stream ---------------------------------------------------------------------------


def small_stream() -> tuple[bytes, list[Event]]:
    """A few kilobytes of every kind of frame, and what reading it must give."""
    peer = client()
    parts: list[tuple[bytearray, list[Event]]] = [
        (peer.send_data("hello"), ["hello"]),
        (peer.send_data(b""), [b""]),
        (peer.send_data(text_of(125)), [text_of(125)]),
        (peer.send_data(b"\x00\xff" * 63), [b"\x00\xff" * 63]),
        (peer.ping(b"ping"), [PingFrame(b"ping")]),
        (peer.send_data("frag", fin=False), []),
        (peer.pong(b"pong"), [PongFrame(b"pong")]),
        (peer.send_data(text_of(600), fin=False), []),
        (peer.send_data("end", fin=True), ["frag" + text_of(600) + "end"]),
        (peer.send_data(bytes(range(256)) * 2), [bytes(range(256)) * 2]),
        (bytearray(raw(0x2, bytes(70000), width=64)), [bytes(70000)]),
        (bytearray(raw(0x1, text_of(300).encode(), width=16)), [text_of(300)]),
        (peer.close(1000, "done"), [CloseFrame(1000, "done")]),
    ]
    return b"".join(bytes(frame) for frame, _ in parts), [event for _, events in parts for event in events]


def test_every_split_point_of_a_stream() -> None:
    data, expected = small_stream()
    assert FrameReader(BIG).feed(data) == expected
    for cut in range(len(data) + 1):
        reader = FrameReader(BIG)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == expected, cut


def test_every_pair_of_split_points_near_frame_boundaries() -> None:
    """Three pieces, cut anywhere in the first 40 bytes of the stream and anywhere in a window around a header."""
    data, expected = small_stream()
    for first in range(0, 40):
        for second in range(first, first + 40):
            reader = FrameReader(BIG)
            assert feed_all(reader, [data[:first], data[first:second], data[second:]]) == expected, (first, second)


def test_a_stream_fed_byte_by_byte() -> None:
    data, expected = small_stream()
    assert feed_all(FrameReader(BIG), [data[i : i + 1] for i in range(len(data))]) == expected


def test_a_stream_fed_in_random_chunks() -> None:
    data, expected = small_stream()
    rng = random.Random(2024)
    for _ in range(200):
        assert feed_all(FrameReader(BIG), random_chunks(data, rng, most=rng.choice([3, 20, 200, 3000]))) == expected


def test_a_stream_of_big_frames_fed_byte_by_byte_and_in_random_chunks() -> None:
    peer = client()
    text = text_of(70000)
    payload = random.Random(3).randbytes(65536)
    data = b"".join(
        bytes(frame)
        for frame in (
            peer.send_data(text),
            peer.ping(b"between"),
            peer.send_data(payload[:65535], fin=False),
            peer.send_data(payload[65535:], fin=True),
            peer.send_data("small"),
        )
    )
    expected: list[Event] = [text, PingFrame(b"between"), payload, "small"]
    assert feed_all(FrameReader(BIG), [data[i : i + 1] for i in range(len(data))]) == expected
    rng = random.Random(5)
    for most in (7, 1000, 70000):
        assert feed_all(FrameReader(BIG), random_chunks(data, rng, most=most)) == expected
    for cut in list(range(0, 20)) + list(range(70000, 70030)) + [len(data) - 1]:
        reader = FrameReader(BIG)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == expected, cut


# ---- violations -------------------------------------------------------------------------------------------------


def test_unmasked_frames() -> None:
    assert violation(FrameReader(BIG), raw(0x1, b"hello", masked=False)).close_code == 1002
    assert violation(FrameReader(BIG), raw(0x9, b"", masked=False)).close_code == 1002
    assert violation(FrameReader(BIG), raw(0x2, b"x" * 300, masked=False)[:2]).close_code == 1002  # from 2 bytes


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
@pytest.mark.parametrize("opcode", [0x1, 0x2, 0x9])
def test_rsv_bits(rsv: int, opcode: int) -> None:
    assert violation(FrameReader(BIG), raw(opcode, b"abc", rsv=rsv)).close_code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(opcode: int) -> None:
    assert violation(FrameReader(BIG), raw(opcode, b"abc")).close_code == 1002
    assert violation(FrameReader(BIG), raw(opcode, b"abc", fin=False)).close_code == 1002


@pytest.mark.parametrize("opcode", [0x8, 0x9, 0xA])
def test_control_frame_over_125_bytes(opcode: int) -> None:
    payload = struct.pack("!H", 1000) + b"x" * 124
    assert violation(FrameReader(BIG), raw(opcode, payload)).close_code == 1002
    assert violation(FrameReader(BIG), raw(opcode, payload)[:4]).close_code == 1002  # before its payload
    assert violation(FrameReader(BIG), raw(opcode, b"x", length=126, width=64)[:10]).close_code == 1002


@pytest.mark.parametrize("opcode", [0x8, 0x9, 0xA])
def test_fragmented_control_frame(opcode: int) -> None:
    assert violation(FrameReader(BIG), raw(opcode, b"", fin=False)).close_code == 1002


def test_continuation_without_a_message() -> None:
    assert violation(FrameReader(BIG), raw(0x0, b"more")).close_code == 1002
    assert violation(FrameReader(BIG), raw(0x0, b"more", fin=False)).close_code == 1002
    reader = FrameReader(BIG)
    assert reader.feed(raw(0x1, b"done") + raw(0x9)) == ["done", PingFrame(b"")]
    assert violation(reader, raw(0x0, b"late")).close_code == 1002


@pytest.mark.parametrize("opcode", [0x1, 0x2])
@pytest.mark.parametrize("fin", [True, False])
def test_new_message_while_one_is_open(opcode: int, fin: bool) -> None:
    reader = FrameReader(BIG)
    assert reader.feed(raw(0x1, b"open", fin=False)) == []
    assert violation(reader, raw(opcode, b"new", fin=fin)).close_code == 1002


def test_64_bit_length_with_the_top_bit_set() -> None:
    frame = bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63 | 5) + b"\0\0\0\0" + b"12345"
    assert violation(FrameReader(1 << 62), frame).close_code == 1002
    assert violation(FrameReader(1 << 62), frame[:10]).close_code == 1002


@pytest.mark.parametrize(("size", "width"), [(0, 16), (125, 16), (0, 64), (125, 64), (65535, 64)])
def test_a_length_not_in_its_shortest_encoding(size: int, width: int) -> None:
    """RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the length" (wsproto refuses it too)."""
    frame = raw(0x2, bytes(size), width=width)
    error = violation(FrameReader(BIG), frame)
    assert error.close_code == 1002 and "shortest" in error.reason
    assert FrameReader(BIG).feed(raw(0x2, bytes(size))) == [bytes(size)]


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"abc\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", "é".encode()[:1] * 300],
    ids=["ff", "continuation-byte", "overlong", "surrogate", "over-max", "truncated", "long"],
)
def test_invalid_utf8_text(payload: bytes) -> None:
    exc = violation(FrameReader(BIG), raw(0x1, payload))  # one frame: the fast path when it is small
    assert exc.close_code == 1007
    exc = violation(FrameReader(BIG), raw(0x9, b"") + raw(0x1, payload))  # the general path
    assert exc.close_code == 1007
    assert exc.events == [PingFrame(b"")]
    fragmented = raw(0x1, payload[:1], fin=False) + raw(0x0, payload[1:], fin=True)
    assert violation(FrameReader(BIG), fragmented).close_code == 1007


def test_utf8_is_checked_once_the_message_completes() -> None:
    reader = FrameReader(BIG)
    assert reader.feed(raw(0x1, b"\xe2\x82", fin=False)) == []  # half a character so far: not yet an error
    assert reader.feed(raw(0x0, b"\xac", fin=True)) == ["€"]


def test_binary_is_not_utf8_checked() -> None:
    assert FrameReader(BIG).feed(raw(0x2, b"\xff\xfe")) == [b"\xff\xfe"]


def test_close_with_a_one_byte_payload() -> None:
    assert violation(FrameReader(BIG), raw(0x8, b"\x03")).close_code == 1002


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes(code: int) -> None:
    assert violation(FrameReader(BIG), raw(0x8, struct.pack("!H", code))).close_code == 1002
    assert violation(FrameReader(BIG), raw(0x8, struct.pack("!H", code) + b"reason")).close_code == 1002


def test_close_reason_not_utf8() -> None:
    assert violation(FrameReader(BIG), raw(0x8, struct.pack("!H", 1000) + b"\xff")).close_code == 1007


# ---- the size cap ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, 1, 10, 125, 126, 1000, 65535, 65536, 100000])
@pytest.mark.parametrize("opcode", [0x1, 0x2])
def test_the_cap_is_inclusive(cap: int, opcode: int) -> None:
    payload = b"a" * cap
    expected = payload.decode() if opcode == 0x1 else payload
    assert FrameReader(cap).feed(raw(opcode, payload)) == [expected]
    assert violation(FrameReader(cap), raw(opcode, payload + b"a")).close_code == 1009


@pytest.mark.parametrize(("size", "header"), [(100, 2), (1000, 4), (70000, 10)])
def test_the_cap_is_enforced_from_the_header_alone(size: int, header: int) -> None:
    """Only the header has arrived (not even the mask): the peer is refused before we buffer its payload."""
    frame = raw(0x2, bytes(size))
    assert violation(FrameReader(size - 1), frame[:header]).close_code == 1009
    reader = FrameReader(size - 1)
    assert reader.feed(frame[: header - 1]) == []
    assert violation(reader, frame[header - 1 : header]).close_code == 1009
    reader = FrameReader(size - 1)
    assert reader.feed(raw(0x9, b"x") + frame[:1]) == [PingFrame(b"x")]
    assert violation(reader, frame[1:header]).close_code == 1009


def test_a_huge_64_bit_length_is_refused_at_once() -> None:
    header = bytes([0x82, 0xFF]) + struct.pack("!Q", (1 << 63) - 1)
    assert violation(FrameReader(BIG), header).close_code == 1009


def test_the_cap_counts_every_fragment() -> None:
    cap = 1000
    reader = FrameReader(cap)
    assert reader.feed(raw(0x2, b"a" * 400, fin=False)) == []
    assert reader.feed(raw(0x9, b"p" * 125)) == [PingFrame(b"p" * 125)]  # control frames do not count
    assert reader.feed(raw(0x0, b"b" * 500, fin=False)) == []
    assert reader.feed(raw(0x0, b"c" * 100, fin=True)) == [b"a" * 400 + b"b" * 500 + b"c" * 100]
    assert reader.feed(raw(0x1, b"x" * 600, fin=False)) == []  # a new message starts from zero
    assert reader.feed(raw(0x0, b"y" * 400, fin=False)) == []
    exc = violation(reader, raw(0x0, b"z", fin=True)[:2])
    assert exc.close_code == 1009


# ---- after the end ---------------------------------------------------------------------------------------------


def test_nothing_is_read_after_a_close_frame() -> None:
    peer = client()
    reader = FrameReader(BIG)
    after = bytes(peer.send_data("after"))
    assert reader.feed(bytes(peer.send_data("before")) + bytes(peer.close(1000)) + after + b"\xff\xff") == [
        "before",
        CloseFrame(1000, ""),
    ]
    assert reader.feed(after) == []
    assert reader.feed(raw(0x1, b"x", masked=False)) == []  # not even a violation


def test_nothing_is_read_after_a_violation() -> None:
    reader = FrameReader(BIG)
    frame = raw(0x1, b"partial")
    assert reader.feed(frame[:4]) == []
    exc = violation(reader, frame[4:] + raw(0x1, b"tail", masked=False))
    assert (exc.close_code, exc.events) == (1002, ["partial"])
    assert reader.feed(bytes(client().send_data("hello"))) == []
    assert reader.feed(raw(0x3)) == []
    reader = FrameReader(BIG)
    assert violation(reader, raw(0x1, b"\xff")).close_code == 1007  # raised by the one-frame path
    assert reader.feed(bytes(client().send_data("hello"))) == []


def test_a_violation_carries_the_events_before_it() -> None:
    peer = client()
    data = bytes(peer.send_data("ok")) + bytes(peer.ping(b"p")) + raw(0x2, b"bad", masked=False)
    exc = violation(FrameReader(BIG), data)
    assert exc.close_code == 1002
    assert exc.events == ["ok", PingFrame(b"p")]
    assert exc.reason == "unmasked client frame"
    assert "1002" in str(exc)


# ---- against wsproto's own parser ---------------------------------------------------------------------------------


def wsproto_events(data_chunks: list[bytes]) -> list[Event]:
    """What wsproto's server side makes of the same bytes, as our events: messages joined, close codes as ints."""
    server = FrameProtocol(client=False, extensions=[])
    events: list[Event] = []
    message: list[str | bytes] = []
    for chunk in data_chunks:
        server.receive_bytes(chunk)
        for frame in server.received_frames():
            payload = frame.payload
            if frame.opcode is Opcode.CLOSE:
                assert isinstance(payload, tuple)
                code, reason = payload
                events.append(CloseFrame(None if code is CloseReason.NO_STATUS_RCVD else int(code), reason))
                continue
            assert isinstance(payload, str | bytes)
            if frame.opcode is Opcode.PING or frame.opcode is Opcode.PONG:
                assert isinstance(payload, bytes)
                events.append(PingFrame(payload) if frame.opcode is Opcode.PING else PongFrame(payload))
            else:
                message.append(payload)
                if frame.message_finished:
                    joined = "".join(message) if frame.opcode is Opcode.TEXT else b"".join(message)  # type: ignore[arg-type]
                    events.append(joined)
                    message = []
    return events


def random_stream(rng: random.Random) -> bytes:
    """A random sequence of valid client frames: whole and fragmented messages of many sizes, control frames
    between fragments, and sometimes a close at the end."""
    peer = client()
    frames: list[bytearray] = []

    def control() -> None:
        kind = rng.random()
        payload = rng.randbytes(rng.choice([0, 1, 4, 125]))
        frames.append(peer.ping(payload) if kind < 0.5 else peer.pong(payload))

    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.2:
            control()
            continue
        size = rng.choice([0, 1, 3, 40, 125, 126, 500, 600, 4000, 65535, 65536, 70001])
        binary = rng.random() < 0.5
        payload: str | bytes = rng.randbytes(size) if binary else "".join(rng.choice("aé€😀") for _ in range(size // 3))
        if roll < 0.6:
            frames.append(peer.send_data(payload))
            continue
        cuts = sorted(rng.randint(0, len(payload)) for _ in range(rng.randint(1, 4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for index, piece in enumerate(pieces):
            frames.append(peer.send_data(piece, fin=index == len(pieces) - 1))
            if rng.random() < 0.4 and index < len(pieces) - 1:
                control()
    if rng.random() < 0.5:
        code = rng.choice([None, 1000, 1001, 1003, 1008, 1011, 3000, 4999])
        frames.append(peer.close(code, rng.choice(["", "bye", "ünï"]) if code else None))
    return b"".join(bytes(frame) for frame in frames)


def test_random_valid_streams_read_as_wsproto_reads_them() -> None:
    rng = random.Random(6455)
    for _ in range(60):
        data = random_stream(rng)
        chunks = random_chunks(data, rng, most=rng.choice([1, 50, 5000, 100000])) if len(data) < 20000 else []
        if not chunks:
            chunks = random_chunks(data, rng, most=rng.choice([2000, 100000]))
        expected = wsproto_events(chunks)
        assert feed_all(FrameReader(BIG), chunks) == expected
        assert FrameReader(BIG).feed(data) == expected
