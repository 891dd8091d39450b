"""The journal's lock-free figures export as the Histogram and Counter they replace (names, labels, `le` bounds)."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest

from storage.metrics import JOURNAL_FIGURES


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_a_batch_counts_in_its_bucket_the_ones_above_and_the_totals() -> None:
    name = "sessiond_storage_journal_append_seconds"
    before = {
        le: sample(f"{name}_bucket", backend="postgres", le=le) for le in ("0.00025", "0.0005", "0.001", "+Inf")
    }
    count, total = sample(f"{name}_count", backend="postgres"), sample(f"{name}_sum", backend="postgres")
    changes = sample("sessiond_storage_journal_changes_total", backend="postgres")
    redis_count = sample(f"{name}_count", backend="redis")

    JOURNAL_FIGURES["postgres"].observe(0.0005, 3)  # on a bound: counts in it (`le`)

    assert sample(f"{name}_bucket", backend="postgres", le="0.00025") == before["0.00025"]
    for le in ("0.0005", "0.001", "+Inf"):
        assert sample(f"{name}_bucket", backend="postgres", le=le) == before[le] + 1
    assert sample(f"{name}_count", backend="postgres") == count + 1
    assert abs(sample(f"{name}_sum", backend="postgres") - (total + 0.0005)) < 1e-12
    assert sample("sessiond_storage_journal_changes_total", backend="postgres") == changes + 3
    assert sample(f"{name}_count", backend="redis") == redis_count  # the other backend's series untouched


def test_a_slow_batch_lands_only_in_the_inf_bucket() -> None:
    name = "sessiond_storage_journal_append_seconds_bucket"
    top, inf = sample(name, backend="redis", le="5.0"), sample(name, backend="redis", le="+Inf")
    JOURNAL_FIGURES["redis"].observe(7.5, 0)
    assert sample(name, backend="redis", le="5.0") == top
    assert sample(name, backend="redis", le="+Inf") == inf + 1


def test_the_exposition_has_both_backends_and_the_histogram_type() -> None:
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE sessiond_storage_journal_append_seconds histogram" in text
    assert "# TYPE sessiond_storage_journal_changes_total counter" in text
    for backend in ("redis", "postgres"):
        assert f'sessiond_storage_journal_append_seconds_bucket{{backend="{backend}",le="0.0001"}}' in text
        assert f'sessiond_storage_journal_changes_total{{backend="{backend}"}}' in text
