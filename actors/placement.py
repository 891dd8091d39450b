"""Which pod should own a session: rendezvous (highest random weight) hashing over the live pods (DESIGN §6).

Every pod computes the same answer from the same member list, with no coordination. When a pod joins or leaves,
only the sessions it wins or held move (about 1/N of them); the others keep their owner. Pure functions: the
lease in Redis, not this, is what guarantees a single owner while views disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(pod: str, session_id: str) -> int:
    """The pod's weight for the session: 64 bits of blake2b over both names (stable across processes)."""
    digest = hashlib.blake2b(f"{pod}\x00{session_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(session_id: str, pods: Iterable[str]) -> str | None:
    """The pod with the highest weight for the session (ties broken by name); None when there is no pod."""
    best: tuple[int, str] | None = None
    for pod in pods:
        candidate = (score(pod, session_id), pod)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]
