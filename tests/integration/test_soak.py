"""A small soak through the real client and server: no errors, every patch once in order, flat memory."""

from __future__ import annotations

from benchmarks.soak import growth, reference, run_soak

PATCHES = 2_000
CONCURRENCY = 16
MAX_RSS_GROWTH = 1.2


def test_soak_answers_every_patch_once_in_order_with_no_errors_and_flat_memory(triton_server):
    spec = triton_server.spec
    pool, expected = reference(triton_server.repo, spec)
    r = run_soak(triton_server.grpc, spec.name, pool, expected, patches=PATCHES, concurrency=CONCURRENCY,
                 max_seconds=240, server_pid=triton_server.server.process.pid, sample_every_s=0.05,
                 progress=False)
    assert (r.failed_requests, r.errors, r.timed_out) == (0, [], False)
    assert (r.answered, r.mismatched) == (PATCHES, 0)
    assert r.rss_samples >= 12 and r.server_rss_mib[0] > 0 and r.client_rss_mib[0] > 0
    assert r.client_rss_growth <= MAX_RSS_GROWTH and r.server_rss_growth <= MAX_RSS_GROWTH
    assert all(r.checks(MAX_RSS_GROWTH).values())


def test_growth_compares_last_and_first_quarter_medians_after_warm_up():
    assert growth([500] * 2 + [100] * 8 + [150] * 10) == (100, 150, 1.5)  # the 500s are warm-up
    assert growth([1, 2, 3]) != growth([1, 2, 3])  # too few samples: nan, never a pass
