#!/usr/bin/env python
"""Long-context attention-KL: how far one GPU goes with StreamKL, and where the materializing baselines stop.

For each N (default 65,536 .. 1,048,576; B=1, H=16, D=128, bf16, causal) it times StreamKL's forward and its
forward+backward (gradients w.r.t. the student's q and k) with CUDA events, and records the peak memory above
the inputs (for forward+backward that includes the two gradients it returns, 2 * N * H * D * 2 bytes). The same run then tries eager PyTorch (streamkl.attention_kl_reference, dtype=None: both
[B, H, N, N] maps) and torch.compile of it at the --baseline-seqlens, forward+backward, so the largest N each
reaches on this GPU sits beside StreamKL's. Nothing is estimated or skipped: a baseline that does not fit
records "OOM".

Reported per StreamKL row: ms, TFLOP/s (KL forward = 2 score products, backward = 4; causal counts half the
score matrix) and, for the forward, the share of the exponential-unit ceiling: the forward evaluates two
exponentials per visible score pair, and the ceiling is 16 ex2 per clock per SM at --clock-ghz (H100 SXM
boost clock by default; the real clock is lower under load, so the share shown is a lower bound).

Examples:
    python bench/long_context.py --out bench/results/        # on an H100: N up to 1,048,576
    python bench/long_context.py --device cpu --seqlens 512 --baseline-seqlens 256 --heads 2   # smoke test
"""

import argparse
import json
import os
import sys
import time

import torch

try:
    import streamkl
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamkl
from streamkl import benchmark as bm  # noqa: E402
from streamkl.reference import attention_kl_reference  # noqa: E402

def _int_list(text):
    return [int(x) for x in text.replace(",", " ").split()]


def make_inputs(n, args, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, args.heads, n, args.d)
    q_s, k_s, q_t, k_t = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    return q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t


def timed(fn, device, repeats, warmup=True):
    """Median ms of ``repeats`` calls and the peak memory above the start during them. The untimed first call
    is left out at the largest N (kernels are compiled ahead of time; one call there takes a minute)."""
    if warmup:
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak, _ = bm.peak_extra_memory(fn, device)
    return sorted(times)[len(times) // 2], peak


def run_ours(n, args, device, dtype):
    q_s, k_s, q_t, k_t = make_inputs(n, args, device, dtype, seed=n)
    largest = n >= 524288
    repeats = 1 if largest else args.repeats

    def fwd():
        with torch.no_grad():
            return streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=True)

    def fwd_bwd():  # the gradients are dropped after each call, so every call's peak includes them
        streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=True).sum().backward()
        q_s.grad = k_s.grad = None

    fwd_ms, fwd_peak = timed(fwd, device, repeats, warmup=not largest)
    fwd_bwd_ms, fwd_bwd_peak = timed(fwd_bwd, device, repeats, warmup=not largest)
    flops_fwd = bm.attention_flops(1, args.heads, n, n, args.d, causal=True, products=2)
    flops_bwd = bm.attention_flops(1, args.heads, n, n, args.d, causal=True, products=4)
    exps = 2 * args.heads * n * (n + 1) / 2
    row = {"method": "ours", "n": n, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
           "fwd_peak_bytes": fwd_peak, "fwd_bwd_peak_bytes": fwd_bwd_peak,
           "fwd_tflops": flops_fwd / fwd_ms / 1e9, "fwd_bwd_tflops": (flops_fwd + flops_bwd) / fwd_bwd_ms / 1e9}
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        ceiling = bm.EX2_PER_CLOCK_PER_SM * sms * args.clock_ghz * 1e9
        row["fwd_exp_share"] = exps / (fwd_ms * 1e-3) / ceiling
    del q_s, k_s, q_t, k_t
    bm.free_memory(device)
    return row


def run_baseline(method, n, args, device, dtype, compiled):
    q_s, k_s, q_t, k_t = make_inputs(n, args, device, dtype, seed=n)
    fn = compiled if method == "compile" else attention_kl_reference

    def fwd_bwd():
        fn(q_s, k_s, q_t, k_t, causal=True, dtype=None).sum().backward()
        q_s.grad = k_s.grad = None

    row = {"method": method, "n": n}
    try:
        row["fwd_bwd_ms"], row["fwd_bwd_peak_bytes"] = timed(fwd_bwd, device, 1, warmup=method == "compile")
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        if not bm.is_oom(exc):
            raise
        row["fwd_bwd_ms"] = "OOM"
    del q_s, k_s, q_t, k_t
    bm.free_memory(device)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--seqlens", type=_int_list, default=[65536, 131072, 262144, 1048576])
    p.add_argument("--baseline-seqlens", type=_int_list, default=[16384, 32768],
                   help="N at which eager PyTorch and torch.compile are tried (forward+backward)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cell (1 at N >= 524288)")
    p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the exponential-unit ceiling")
    p.add_argument("--out", metavar="DIR", help="write long_context.json here")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = None if args.no_compile else torch.compile(attention_kl_reference)

    rows = [run_ours(n, args, device, dtype) for n in args.seqlens]
    for n in args.baseline_seqlens:
        rows.append(run_baseline("eager", n, args, device, dtype, compiled))
        if compiled is not None:
            rows.append(run_baseline("compile", n, args, device, dtype, compiled))

    gib = lambda b: f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else "-"
    ms = lambda v: bm.format_ms(v) if isinstance(v, (int, float)) else (v or "-")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else bm.cpu_name()
    print(f"# long-context attention KL, causal, B=1 H={args.heads} D={args.d} {bm.dtype_name(dtype)}, {name}, "
          f"torch {torch.__version__}")
    headers = ["method", "N", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd exp share",
               "peak GiB fwd", "peak GiB fwd+bwd"]
    table = []
    for r in rows:
        table.append([r["method"], str(r["n"]), ms(r.get("fwd_ms")), ms(r.get("fwd_bwd_ms")),
                      f"{r['fwd_tflops']:.3g}" if "fwd_tflops" in r else "-",
                      f"{r['fwd_bwd_tflops']:.3g}" if "fwd_bwd_tflops" in r else "-",
                      f"{r['fwd_exp_share']:.0%}" if "fwd_exp_share" in r else "-",
                      gib(r.get("fwd_peak_bytes")), gib(r.get("fwd_bwd_peak_bytes"))])
    print(bm.format_table(headers, table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "long_context.json"), "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "heads": args.heads, "d": args.d,
                       "dtype": bm.dtype_name(dtype), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
