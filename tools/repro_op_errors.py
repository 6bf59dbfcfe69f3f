"""Which C++ argument errors raise cleanly and which crash the process (diagnosis of the SIGSEGV seen on the
GPU machine's torch 2.11). Each case runs in its own subprocess; prints one line per case."""

import subprocess
import sys

CASES = {
    "fwd bad divergence (CPU)": 'ops.attention_kl_fwd(q, q, q, q, 0.5, 0.5, False, "xx")',
    "fwd wrong rank (CPU)": 'ops.attention_kl_fwd(q[0], q, q, q, 0.5, 0.5, False, "forward")',
    "fwd bad window (CPU)": 'ops.attention_kl_fwd(q, q, q, q, 0.5, 0.5, False, "forward", -2, 0)',
    "bwd bad divergence (CPU)": 'ops.attention_kl_bwd(r, q, q, q, q, r, r, r, 0.5, 0.5, False, "xx", False)',
    "jsd fwd bad beta (CPU)": 'ops.attention_jsd_fwd(q, q, q, q, 0.5, 0.5, False, 2.0)',
    "linear fwd V mismatch (CPU)": 'ops.linear_kl_fwd(x, w, None, x, w[:3], None, None, 1.0, "forward", 0.5, -100, False)',
    "python-side check (CPU)": 'streamkl.attention_kl(q, q, q, q, divergence="xx")',
}
PRELUDE = """
import torch, streamkl
ops = torch.ops.streamkl
q = torch.randn(1, 2, 8, 4); r = torch.randn(1, 2, 8); x = torch.randn(5, 4); w = torch.randn(7, 4)
try:
    {call}
    print("no error")
except Exception as e:
    print("raised", type(e).__name__)
"""

for name, call in CASES.items():
    run = subprocess.run([sys.executable, "-c", PRELUDE.format(call=call)], capture_output=True, text=True)
    what = run.stdout.strip() or f"CRASH rc={run.returncode}"
    print(f"{name:32s} {what}")
