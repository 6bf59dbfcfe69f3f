"""A 16k x 16k attention-KL on the CPU needs far less extra memory than one N_q x N_k fp32 buffer (1 GiB).

Runs in a fresh interpreter so that the peak RSS (ru_maxrss) reflects only this problem. About 25 s on a
2-core CPU (forward ~6 s, backward ~16 s), so it stays in the default CI run.
"""

import json
import subprocess
import sys
import textwrap

N = 16384
D = 16
LIMIT_MIB = 128

SCRIPT = textwrap.dedent(r"""
    import json, resource, sys, time
    import torch
    import streamkl

    N, D = int(sys.argv[1]), int(sys.argv[2])

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    g = torch.Generator().manual_seed(12345)
    q_s, k_s, q_t, k_t = (torch.randn(1, 1, N, D, generator=g) for _ in range(4))
    q_s.requires_grad_()
    k_s.requires_grad_()
    # Warm-up on a tiny problem: loads kernels, thread pools and autograd machinery.
    tiny = [x[:, :, :40].detach().clone().requires_grad_() for x in (q_s, k_s, q_t, k_t)]
    streamkl.attention_kl(*tiny, causal=True).sum().backward()

    before = peak_mib()
    t0 = time.perf_counter()
    kl = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    t1 = time.perf_counter()
    after_fwd = peak_mib()
    kl.sum().backward()
    t2 = time.perf_counter()
    after_bwd = peak_mib()

    # Spot-check a few rows against the reference (rows are independent given all keys; only [rows, N]
    # scores are materialized, after the measurement).
    rows = torch.tensor([0, 1, 4097, N - 1])
    q_rows = q_s.detach()[:, :, rows].double().requires_grad_()
    ref = streamkl.attention_kl_reference(q_rows, k_s.detach(), q_t[:, :, rows], k_t)
    (dq_ref,) = torch.autograd.grad(ref.sum(), q_rows)
    out = kl.detach()[:, :, rows].double()
    dq = q_s.grad[:, :, rows].double()
    print(json.dumps(dict(
        before_mib=before, after_fwd_mib=after_fwd, after_bwd_mib=after_bwd,
        fwd_s=t1 - t0, bwd_s=t2 - t1, threads=torch.get_num_threads(),
        finite=bool(torch.isfinite(kl).all() and torch.isfinite(q_s.grad).all() and torch.isfinite(k_s.grad).all()),
        kl_rel_err=((out - ref).norm() / ref.norm()).item(),
        dq_rel_err=((dq - dq_ref).norm() / dq_ref.norm()).item(),
        dk_nonzero=bool(k_s.grad.abs().sum() > 0),
    )))
""")


def test_16k_attention_kl_memory():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(D)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    fwd_growth = stats["after_fwd_mib"] - stats["before_mib"]
    bwd_growth = stats["after_bwd_mib"] - stats["before_mib"]
    full_matrix_mib = N * N * 4 / 2**20
    print(f"\n{N}x{N}, D={D}, {stats['threads']} threads: peak RSS {stats['before_mib']:.1f} MiB before, "
          f"+{fwd_growth:.1f} MiB after forward ({stats['fwd_s']:.1f} s), +{bwd_growth:.1f} MiB after backward "
          f"({stats['bwd_s']:.1f} s); one N_q*N_k fp32 buffer is {full_matrix_mib:.0f} MiB; "
          f"spot-check rel err kl {stats['kl_rel_err']:.1e}, dq {stats['dq_rel_err']:.1e}")
    assert stats["finite"]
    assert stats["dk_nonzero"]
    assert stats["kl_rel_err"] < 1e-4
    assert stats["dq_rel_err"] < 1e-4
    assert fwd_growth < LIMIT_MIB, f"forward grew peak RSS by {fwd_growth:.1f} MiB"
    assert bwd_growth < LIMIT_MIB, f"forward + backward grew peak RSS by {bwd_growth:.1f} MiB"
