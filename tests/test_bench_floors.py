"""The hardware-floor lines of bench/attention.py's summary (on a GPU run): each method's time against the time its
tensor-core work and its exponentials take at the peak rates, computed here from first principles on made-up
records (no GPU needed; the floors only depend on the problem, the SM count and the clock)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import attention as bench_attention  # noqa: E402

SMS, CLOCK_GHZ, HEADS, N = 100, 1.5, 4, 1024
CLOCKS_PER_MS = SMS * CLOCK_GHZ * 1e6


def _floors(products, exps_per_pair, d, causal):
    """(tensor ms, exp ms): 2 flops per multiply-add, 4096 of them per clock per SM; 16 ex2 per clock per SM."""
    pairs = HEADS * N * N / (2 if causal else 1)
    return products * 2 * pairs * d / (4096 * CLOCKS_PER_MS), exps_per_pair * pairs / (16 * CLOCKS_PER_MS)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_floor_lines_match_first_principles(d, causal):
    # KL: forward 2 products + 2 exps per pair, fwd+bwd 6 + 4; SDPA: forward 2 + 1, fwd+bwd 7 + 2.
    counts = {("ours", "fwd"): (2, 2), ("ours", "fwd+bwd"): (6, 4),
              ("sdpa_cudnn", "fwd"): (2, 1), ("sdpa_cudnn", "fwd+bwd"): (7, 2)}
    slowdown = {("ours", "fwd"): 1.25, ("ours", "fwd+bwd"): 1.5, ("sdpa_cudnn", "fwd"): 2.0,
                ("sdpa_cudnn", "fwd+bwd"): 3.0}
    records, expected = [], []
    for (method, pass_name), (products, exps) in counts.items():
        t, e = _floors(products, exps, d, causal)
        time_ms = slowdown[method, pass_name] * (t + e)
        records.append(bench_attention.Record(method, d, N, causal, pass_name, time_ms=time_ms, tflops=1.0))
        expected.append(f"{pass_name} {method} {time_ms / (t + e):.2f} / {time_ms / max(t, e):.2f} "
                        f"(T {t:.3g}, E {e:.3g} ms)")
    lines = bench_attention.floor_lines(records, d, N, "sdpa_cudnn", (SMS, CLOCK_GHZ), 1, HEADS)
    assert len(lines) == 2 and lines[1].startswith("  causal" if causal else "  full")
    for part in expected:
        assert part in lines[1], (part, lines[1])


def test_summary_has_floor_lines_only_with_a_gpu():
    records = [bench_attention.Record(m, 128, N, False, p, time_ms=1.0, tflops=1.0)
               for m in ("ours", "sdpa_math") for p in ("fwd", "fwd+bwd")]
    cpu = bench_attention.summary(records, N, 128, "sdpa_math")
    gpu = bench_attention.summary(records, N, 128, "sdpa_math", (SMS, CLOCK_GHZ), 1, HEADS)
    assert not any("hardware floors" in line for line in cpu)
    assert gpu[:len(cpu)] == cpu and "hardware floors" in gpu[len(cpu)]
