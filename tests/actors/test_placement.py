"""Rendezvous placement (actors/placement.py, DESIGN §6): every pod computes the same owner from the same member
list, the load is balanced, and a membership change moves only the sessions it must (about 1/N of them)."""

from __future__ import annotations

import base64
import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import placement
from actors.placement import owner, score

POD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-."
pod_names = st.text(POD_ALPHABET, min_size=1, max_size=24)
pod_sets = st.sets(pod_names, min_size=1, max_size=8)
session_names = st.text(min_size=0, max_size=40)


def session_id(index: int) -> str:
    """A session id shaped like `secrets.token_urlsafe(16)` (22 URL-safe characters) but derived from `index`, so
    every run checks the same ids."""
    digest = hashlib.sha256(index.to_bytes(8, "big")).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


SESSIONS_10K = [session_id(i) for i in range(10_000)]
SESSIONS_2K = SESSIONS_10K[:2_000]


def owners(sessions: list[str], pods: list[str]) -> list[str | None]:
    return [owner(s, pods) for s in sessions]


# ---- determinism ---------------------------------------------------------------------------------------


def test_score_is_a_stable_64_bit_number() -> None:
    """The weight is computed from both names only (no per-process salt such as `hash()`): a fixed value pins it,
    so two pods (two processes) always agree."""
    expected = int.from_bytes(hashlib.blake2b(b"pod-a\x00s1", digest_size=8).digest(), "big")
    assert score("pod-a", "s1") == expected
    assert 0 <= score("pod-a", "s1") < 1 << 64
    assert score("pod-a", "s1") != score("pod-b", "s1")
    assert score("pod-a", "s1") != score("pod-a", "s2")


def test_score_separates_the_names() -> None:
    """`pod + session` must not collide with a different split of the same characters ("ab"+"c" vs "a"+"bc"),
    or two pods could get identical weights for related sessions."""
    assert score("ab", "c") != score("a", "bc")


def test_no_pods_means_no_owner() -> None:
    assert owner("s1", []) is None
    assert owner("s1", iter(())) is None


@settings(max_examples=200, deadline=None)
@given(pods=pod_sets, session=session_names, seed=st.integers(0, 2**32 - 1))
def test_owner_is_deterministic_and_order_independent(pods: set[str], session: str, seed: int) -> None:
    """Every pod must reach the same answer whatever order its member list comes in (no coordination, §6)."""
    ordered = sorted(pods)
    shuffled = list(pods)
    random.Random(seed).shuffle(shuffled)
    first = owner(session, ordered)
    assert first in pods
    assert owner(session, ordered) == first
    assert owner(session, shuffled) == first
    assert owner(session, reversed(ordered)) == first  # any iterable, consumed once
    assert owner(session, ordered + ordered) == first  # a duplicated member changes nothing


@settings(max_examples=200, deadline=None)
@given(pods=pod_sets, session=session_names)
def test_owner_has_the_highest_score(pods: set[str], session: str) -> None:
    """The owner is the highest-random-weight pod: no other pod scores higher for the session."""
    chosen = owner(session, pods)
    assert chosen is not None
    assert all(score(chosen, session) >= score(pod, session) for pod in pods)


def test_ties_are_broken_by_name_whatever_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """With equal weights the greatest name wins, so even a (practically impossible) tie is decided the same way
    on every pod rather than by list order."""
    monkeypatch.setattr(placement, "score", lambda pod, session_id: 7)
    assert owner("s1", ["pod-b", "pod-c", "pod-a"]) == "pod-c"
    assert owner("s1", ["pod-c", "pod-a", "pod-b"]) == "pod-c"


# ---- balance --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_pods", [2, 3, 4, 5, 8])
def test_sessions_spread_within_20_percent_of_the_mean(n_pods: int) -> None:
    """Over 10,000 sessions every pod owns within 20 % of the mean share (the issue's requirement): a skewed hash
    would overload one pod."""
    pods = [f"sessiond-{i}" for i in range(n_pods)]
    counts = Counter(owners(SESSIONS_10K, pods))
    mean = len(SESSIONS_10K) / n_pods
    assert set(counts) == set(pods)
    for pod, count in counts.items():
        assert abs(count - mean) <= 0.2 * mean, (pod, count, mean)


def test_similar_pod_names_are_balanced_too() -> None:
    """Pod names that differ in one character (pod ids are often `host-1`, `host-2`) still spread evenly."""
    pods = ["sessiond-7d9f-1", "sessiond-7d9f-2", "sessiond-7d9f-3"]
    counts = Counter(owners(SESSIONS_10K, pods))
    mean = len(SESSIONS_10K) / len(pods)
    assert all(abs(count - mean) <= 0.2 * mean for count in counts.values()), counts


# ---- minimal movement -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data(), old=pod_sets)
def test_adding_a_pod_moves_only_sessions_to_it(data: st.DataObject, old: set[str]) -> None:
    """A joining pod takes about 1/(n+1) of the sessions, and only for itself: a session never moves between two
    pods that were already members (which would be a needless handoff, §6 Moves)."""
    new_pod = data.draw(pod_names.filter(lambda name: name not in old), label="new_pod")
    before_pods = sorted(old)
    after_pods = [*before_pods, new_pod]
    before = owners(SESSIONS_2K, before_pods)
    after = owners(SESSIONS_2K, after_pods)
    moved = 0
    for was, now in zip(before, after, strict=True):
        if was != now:
            assert now == new_pod, (was, now)
            moved += 1
    expected = len(SESSIONS_2K) / len(after_pods)
    # Binomial: sigma is at most ~22 sessions here; 30 % of the expectation is over 4 sigma for every n.
    assert abs(moved - expected) <= 0.3 * expected, (moved, expected)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), pods=st.sets(pod_names, min_size=2, max_size=8))
def test_removing_a_pod_moves_only_its_sessions(data: st.DataObject, pods: set[str]) -> None:
    """A leaving (or dead) pod's sessions go to the others; every other session keeps its owner."""
    members = sorted(pods)
    gone = data.draw(st.sampled_from(members), label="gone")
    remaining = [pod for pod in members if pod != gone]
    before = owners(SESSIONS_2K, members)
    after = owners(SESSIONS_2K, remaining)
    for was, now in zip(before, after, strict=True):
        if was == gone:
            assert now in remaining
        else:
            assert now == was, (was, now)


def test_removing_the_last_pod_leaves_no_owner() -> None:
    assert owners(SESSIONS_2K[:10], ["solo"]) == ["solo"] * 10
    assert owners(SESSIONS_2K[:10], []) == [None] * 10
