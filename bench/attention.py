#!/usr/bin/env python
"""Attention-KL benchmark: StreamKL against every reasonable PyTorch baseline, in one run.

For each head dim D, sequence length N and mask (causal or not), at B=1, H=16, bf16 by default, it measures
the forward and the forward+backward (gradients w.r.t. the student's q and k; the teacher is detached) of:

    ours         streamkl.attention_kl (streaming, O(rows) extra memory)
    eager        streamkl.attention_kl_reference(..., dtype=None): materializes both [B, H, N, N] maps
    compile      torch.compile of that same reference
    chunked      a query-chunked PyTorch loop: [B, H, chunk, N] at a time, torch.utils.checkpoint per chunk
                 (so the backward recomputes one chunk at a time instead of keeping all of them); under a
                 causal mask each chunk only multiplies the keys its rows can see
    sdpa_cudnn   F.scaled_dot_product_attention with SDPBackend.CUDNN_ATTENTION   } the speed-of-light
    sdpa_flash   F.scaled_dot_product_attention with SDPBackend.FLASH_ATTENTION   } proxy: q, k, v [B, H, N, D]
    sdpa_math    (CPU only) SDPBackend.MATH, so the script can be smoke-tested without a GPU

Every cell records the median time (ms), the peak extra memory (bytes above what was allocated before the
call, so inputs do not count), TFLOP/s, and for KL methods the max abs difference of the forward output from
ours. Cells that run out of memory record "OOM"; cells whose estimated footprint exceeds --mem-limit-gb are
not attempted and record "skipped (est. X GB)"; other failures record "error: ...".

Flop counts (2 flops per multiply-add, half of the score matrix under a causal mask): KL forward = 2 score
products (student and teacher QK^T), KL backward = 4 (recompute both, then dQ and dK); SDPA forward = 2
(QK^T, PV), SDPA backward = 5 (FlashAttention's count).

Examples:
    python bench/attention.py --out results/            # the full sweep on a GPU
    python bench/attention.py --quick                   # D=128, N in {4096, 8192}, causal and not
    python bench/attention.py --device cpu --quick      # tiny CPU smoke test
    python bench/attention.py --scenario all            # GQA, varlen, DSA-style shapes (bench/attention_scenarios.py)
    python bench/attention.py --scenario all --device cpu --quick   # their CPU smoke test (< 1 min)
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    import streamkl
except ImportError:  # run from a source checkout without `pip install -e .`: use the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamkl
from streamkl import benchmark as bm  # noqa: E402
from streamkl.reference import attention_kl_reference, causal_mask, kl_from_scores  # noqa: E402

KL_METHODS = ("ours", "eager", "compile", "chunked")
GPU_SDPA = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION"}
CPU_SDPA = {"sdpa_math": "MATH"}
PASSES = ("fwd", "fwd+bwd")
SCENARIOS = ("gqa", "varlen", "dsa", "all")  # --scenario values other than the default sweep
MASK_MODES = {"both": [False, True], "full": [False], "causal": [True]}  # --mask -> causal flags to run
GB = 1e9

FULL = dict(dims=[64, 128], seqlens=[1024, 4096, 8192, 16384, 32768])
QUICK = dict(dims=[128], seqlens=[4096, 8192])
CPU_QUICK = dict(dims=[64], seqlens=[256, 512], heads=2)


# ----------------------------------------------------------------------------------------------- baselines

def _kl_rows(q_s, k_s, q_t, k_t, offset: int, causal: bool, scale_s: float, scale_t: float,
             divergence: str) -> torch.Tensor:
    """Materialized divergence of a block of query rows; row ``r`` sees key ``j`` iff ``j <= r + offset``.

    Same numerics as ``attention_kl_reference(dtype=None)``: products in the input dtype, softmax in fp32
    (fp64 for fp64 inputs).
    """
    s = scale_s * (q_s @ k_s.transpose(-1, -2))
    t = scale_t * (q_t @ k_t.transpose(-1, -2))
    allowed = causal_mask(s.shape[-2], s.shape[-1], s.device, offset=offset) if causal else None
    return kl_from_scores(s, t, allowed=allowed, divergence=divergence)


def chunked_attention_kl(q_s, k_s, q_t, k_t, *, causal: bool = False, scale_s: Optional[float] = None,
                         scale_t: Optional[float] = None, divergence: str = "forward",
                         chunk: int = 1024) -> torch.Tensor:
    """Query-chunked materializing attention KL with activation checkpointing per chunk.

    Peak memory is that of one ``[B, H, chunk, N_k]`` block (forward and backward). With ``causal`` (aligned
    bottom-right, like streamkl) a chunk only multiplies the keys its last row can see.
    """
    scale_s = 1.0 / math.sqrt(q_s.shape[-1]) if scale_s is None else scale_s
    scale_t = 1.0 / math.sqrt(q_t.shape[-1]) if scale_t is None else scale_t
    n_q, n_k = q_s.shape[2], k_s.shape[2]
    outputs = []
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        offset = start + n_k - n_q
        keys = min(n_k, max(1, stop + n_k - n_q)) if causal else n_k
        outputs.append(checkpoint(_kl_rows, q_s[:, :, start:stop], k_s[:, :, :keys], q_t[:, :, start:stop],
                                  k_t[:, :, :keys], offset, causal, scale_s, scale_t, divergence,
                                  use_reentrant=False))
    return torch.cat(outputs, dim=2)


def eager_attention_kl(q_s, k_s, q_t, k_t, **kwargs):
    """The eager PyTorch baseline: the materializing reference in the input dtype."""
    return attention_kl_reference(q_s, k_s, q_t, k_t, dtype=None, **kwargs)


def _raise_compile_limits() -> None:
    """Let dynamo keep one specialization per shape in the sweep instead of falling back to eager."""
    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


def compiled_attention_kl() -> Callable:
    """A fresh ``torch.compile`` of the eager baseline (static shapes; dynamo state reset first)."""
    torch._dynamo.reset()
    _raise_compile_limits()
    return torch.compile(eager_attention_kl, dynamic=False)


# ----------------------------------------------------------------------------------------------- estimates

def estimated_bytes(method: str, pass_name: str, batch: int, heads: int, n: int, elem: int, causal: bool,
                    chunk: int) -> int:
    """Rough peak extra bytes of a method, used to skip cells that obviously cannot fit.

    Per ``[B, H, N, N]`` score element: eager keeps both scores in the input dtype plus ~5 fp32 maps in the
    forward (log-softmaxes, ratio, exp, product) and ~7 in the backward; a causal mask adds the masked
    copies. torch.compile fuses down to about one fp32 map forward, two forward+backward. The chunked loop
    holds one chunk's worth of eager maps. Ours and SDPA are O(N).
    """
    per_elem = 2 * elem + (20 if pass_name == "fwd" else 28) + (2 * elem if causal else 0)
    scores = batch * heads * n * n
    if method == "eager":
        return scores * per_elem
    if method == "compile":
        return scores * (4 if pass_name == "fwd" else 8)
    if method == "chunked":
        return batch * heads * min(chunk, n) * n * per_elem
    return 0


def memory_limit_bytes(mem_limit_gb: Optional[float], device) -> float:
    """Cells estimated above this are skipped: ``--mem-limit-gb``, else 75 GB on a GPU, 80% of free RAM on CPU."""
    if mem_limit_gb is not None:
        return mem_limit_gb * GB
    if device.type == "cuda":
        return 75 * GB
    free = bm.available_memory_bytes(device)
    return 0.8 * free if free else 8 * GB


def ours_unavailable_reason(device) -> Optional[str]:
    """Why ``ours`` cannot run at all on ``device`` (a GPU without compiled kernels), else ``None``."""
    if device.type == "cuda" and not streamkl.cuda_available():
        return "unavailable (no CUDA kernels compiled in)"
    return None


# ----------------------------------------------------------------------------------------------- records

@dataclasses.dataclass
class Record:
    """One measured (or skipped) cell of the sweep."""
    method: str
    head_dim: int
    seqlen: int
    causal: bool
    pass_name: str
    status: str = "ok"
    time_ms: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    tflops: Optional[float] = None
    max_abs_diff_vs_ours: Optional[float] = None
    estimated_bytes: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def note_forward_output(record: Record, out, ours_out):
    """Ours' forward output (returned, to compare the baselines of the same cell against), or a baseline's
    max |difference| from it, stored on its record."""
    if record.method == "ours":
        return out
    if ours_out is not None:
        record.max_abs_diff_vs_ours = (out.float() - ours_out.float()).abs().max().item()
    return ours_out


def flops_for(method: str, pass_name: str, batch: int, heads: int, n: int, d: int, causal: bool) -> float:
    """Useful flops of one call (see the module docstring for the product counts)."""
    sdpa = method.startswith("sdpa")
    products = 2 if pass_name == "fwd" else (7 if sdpa else 6)
    return bm.attention_flops(batch, heads, n, n, d, causal=causal, products=products)


def exps_for(method: str, pass_name: str, batch: int, heads: int, n: int, causal: bool) -> float:
    """Exponentials of one call: per visible score pair, the KL forward takes 2 (one per side) and its backward 2
    more (recomputed probabilities); SDPA's forward 1 and its backward 1."""
    per_pair = 1 if method.startswith("sdpa") else 2
    passes = 1 if pass_name == "fwd" else 2
    return per_pair * passes * batch * heads * n * n / (2 if causal else 1)


# ----------------------------------------------------------------------------------------------- measuring

def measure(step: Callable, device, repeats: Optional[int], context: Callable = contextlib.nullcontext):
    """Warm up ``step`` once (compiles, cuDNN plans), measure its peak extra memory, then time it.

    Returns ``(time_ms, peak_extra_bytes, output_of_the_memory_call)``.
    """
    with context():
        step()
        peak, output = bm.peak_extra_memory(step, device)
        time_ms = bm.time_fn(step, device, repeats=repeats, warmup=0)
    return time_ms, peak, output


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"error: {type(exc).__name__}: {text[:120]}"


def run_cell(record: Record, step_factory: Callable, device, repeats: Optional[int], context=contextlib.nullcontext):
    """Fill ``record`` by measuring ``step_factory()``; OOM and other failures become its status.

    Returns the forward output of the memory call (or ``None``).
    """
    output = None
    try:
        record.time_ms, record.peak_extra_bytes, output = measure(step_factory(), device, repeats, context)
    except Exception as exc:  # noqa: BLE001  (one failing baseline must not end a long sweep)
        record.status = "OOM" if bm.is_oom(exc) else _short_error(exc)
        if not bm.is_oom(exc):
            print(f"\n{record.method} D={record.head_dim} N={record.seqlen} causal={record.causal} "
                  f"{record.pass_name}: {record.status}", file=sys.stderr)
        output = None
    bm.free_memory(device)
    return output


class Sweep:
    """Runs every (D, N, mask) cell for every method and pass; collects :class:`Record` objects."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.dtype = bm.resolve_dtype(args.dtype)
        self.sdpa = GPU_SDPA if device.type == "cuda" else CPU_SDPA
        self.methods = [m for m in KL_METHODS + tuple(self.sdpa) if m in args.methods]
        self.records: List[Record] = []
        self.mem_limit = self._memory_limit()
        self.ours_reason = self._ours_unavailable()

    def _memory_limit(self) -> float:
        return memory_limit_bytes(self.args.mem_limit_gb, self.device)

    def _ours_unavailable(self) -> Optional[str]:
        return ours_unavailable_reason(self.device)

    def cells(self):
        """The (D, N, causal) cells in sweep order."""
        for d in self.args.dims:
            for causal in self.args.causal_modes:
                for n in self.args.seqlens:
                    yield d, n, causal

    def total_steps(self) -> int:
        return sum(1 for _ in self.cells()) * len(self.methods) * len(PASSES)

    def run(self, progress: bm.Progress) -> List[Record]:
        for d, n, causal in self.cells():
            self._run_cell(d, n, causal, progress)
        return self.records

    # -- one (D, N, causal) cell ------------------------------------------------------------------------

    def _run_cell(self, d: int, n: int, causal: bool, progress: bm.Progress) -> None:
        a = self.args
        kl_sets = bm.make_attention_inputs(a.batch, a.heads, n, d, self.dtype, self.device, seed=a.seed,
                                           n_sets=a.rotate)
        q, k, v, _ = bm.make_attention_inputs(a.batch, a.heads, n, d, self.dtype, self.device,
                                              seed=a.seed + 1)[0]
        for t in (q, k, v):
            t.requires_grad_(True)
        grad_out = torch.randn_like(q)
        ours_out = None
        for method in self.methods:
            fn = None if method.startswith("sdpa") else self._kl_function(method)
            for pass_name in PASSES:
                progress.step(f"D={d} N={n} {'causal' if causal else 'full'} {method} {pass_name}")
                record = Record(method, d, n, causal, pass_name)
                self.records.append(record)
                if fn is None:
                    self._run_sdpa(record, q, k, v, grad_out)
                    continue
                out = self._run_kl(record, fn, kl_sets)
                if pass_name == "fwd" and out is not None:
                    ours_out = note_forward_output(record, out, ours_out)
        for record in self.records:
            if record.ok and record.tflops is None:
                flops = flops_for(record.method, record.pass_name, a.batch, a.heads, record.seqlen,
                                  record.head_dim, record.causal)
                record.tflops = flops / (record.time_ms * 1e-3) / 1e12
        del kl_sets, q, k, v, grad_out
        bm.free_memory(self.device)

    def _kl_function(self, method: str) -> Callable:
        """The KL implementation called ``method`` (a fresh compile for ``compile``)."""
        if method == "ours":
            return streamkl.attention_kl
        if method == "eager":
            return eager_attention_kl
        if method == "compile":
            return compiled_attention_kl()
        if method == "chunked":
            return functools.partial(chunked_attention_kl, chunk=self.args.chunk)
        raise ValueError(f"unknown KL method {method!r}")

    def _run_kl(self, record: Record, fn: Callable, kl_sets) -> Optional[torch.Tensor]:
        """Measure one KL method and pass; returns the output of its memory call (or ``None``).

        Every method's memory call sees the same input set, so forward outputs can be compared.
        """
        a = self.args
        if record.method == "ours" and self.ours_reason:
            record.status = self.ours_reason
            return None
        est = estimated_bytes(record.method, record.pass_name, a.batch, a.heads, record.seqlen,
                              self.dtype.itemsize, record.causal, a.chunk)
        record.estimated_bytes = est
        if est > self.mem_limit:
            record.status = f"skipped (est. {est / GB:.0f} GB)"
            return None
        kwargs = dict(causal=record.causal, divergence=a.divergence)

        def factory():
            rotation = bm.Rotation(kl_sets)
            if record.pass_name == "fwd":
                return bm.forward_step(fn, rotation, **kwargs)
            return bm.forward_backward_step(fn, rotation, n_grad=2, **kwargs)

        return run_cell(record, factory, self.device, a.repeats)

    def _run_sdpa(self, record: Record, q, k, v, grad_out) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.sdpa[record.method])

        def factory():
            if record.pass_name == "fwd":
                return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=record.causal).detach()
            return lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=record.causal),
                                               (q, k, v), grad_out)

        run_cell(record, factory, self.device, self.args.repeats, context=lambda: sdpa_kernel(backend))


# ----------------------------------------------------------------------------------------------- reporting

def _find(records, method, d, n, causal, pass_name) -> Optional[Record]:
    for r in records:
        if (r.method, r.head_dim, r.seqlen, r.causal, r.pass_name) == (method, d, n, causal, pass_name):
            return r
    return None


def _short_status(r: Optional[Record]) -> str:
    if r is None:
        return "-"
    if r.ok:
        return bm.format_ms(r.time_ms)
    if r.status.startswith("skipped"):
        return "skip"
    if r.status.startswith(("unavailable", "n/a")):
        return "n/a"
    return "OOM" if r.status == "OOM" else "err"


def _short_memory(r: Optional[Record]) -> str:
    if r is None or not r.ok:
        return _short_status(r)
    return f"{r.peak_extra_bytes / GB:.2f}" if r.peak_extra_bytes >= 0.01 * GB else \
        f"{r.peak_extra_bytes / 2**20:.1f}M"


def _cell_keys(records):
    keys = []
    for r in records:
        key = (r.head_dim, r.causal, r.seqlen)
        if key not in keys:
            keys.append(key)
    return keys


def _methods_in(records):
    methods = []
    for r in records:
        if r.method not in methods:
            methods.append(r.method)
    return methods


def time_table(records) -> str:
    """Median ms per method, ``fwd / fwd+bwd``, one row per (D, mask, N)."""
    methods = _methods_in(records)
    rows = []
    for d, causal, n in _cell_keys(records):
        row = [str(d), "causal" if causal else "full", str(n)]
        for m in methods:
            row.append(f"{_short_status(_find(records, m, d, n, causal, 'fwd'))} / "
                       f"{_short_status(_find(records, m, d, n, causal, 'fwd+bwd'))}")
        rows.append(row)
    return bm.format_table(["D", "mask", "N"] + methods, rows, align="rlr" + "r" * len(methods))


def _bytes_per_row(r: Optional[Record], rows: int) -> str:
    return f"{r.peak_extra_bytes / rows:.0f}" if r is not None and r.ok else "-"


def memory_table(records, batch: int, heads: int) -> str:
    """Peak extra memory per method in GB (``M`` = MiB), ``fwd / fwd+bwd``, plus ours in bytes per query row."""
    methods = _methods_in(records)
    rows = []
    for d, causal, n in _cell_keys(records):
        row = [str(d), "causal" if causal else "full", str(n)]
        for m in methods:
            row.append(f"{_short_memory(_find(records, m, d, n, causal, 'fwd'))} / "
                       f"{_short_memory(_find(records, m, d, n, causal, 'fwd+bwd'))}")
        if "ours" in methods:
            row.append(" / ".join(_bytes_per_row(_find(records, "ours", d, n, causal, p), batch * heads * n)
                                  for p in PASSES))
        rows.append(row)
    extra = ["ours B/row"] if "ours" in methods else []
    return bm.format_table(["D", "mask", "N"] + methods + extra, rows,
                           align="rlr" + "r" * (len(methods) + len(extra)))


def agreement_line(records) -> Optional[str]:
    """Largest forward-output difference from ours, per baseline, over all cells (a sanity check)."""
    worst: Dict[str, float] = {}
    for r in records:
        if r.max_abs_diff_vs_ours is not None:
            worst[r.method] = max(worst.get(r.method, 0.0), r.max_abs_diff_vs_ours)
    if not worst:
        return None
    return "max |KL - ours| over all cells: " + ", ".join(f"{m} {v:.2e}" for m, v in worst.items())


def _nearest(values, target):
    return min(values, key=lambda v: (abs(math.log(v / target)), -v)) if values else None


def summary(records, want_n: int, want_d: int, sol_method: str, gpu: Optional[Tuple[int, float]] = None,
            batch: int = 1, heads: int = 16) -> List[str]:
    """Ratio lines ours / speed-of-light (cuDNN on GPU) and TFLOP/s at (N, D) or the nearest measured; on a GPU
    (gpu = (SMs, clock GHz)) also each one's time against the hardware floors of its tensor-core work and its
    exponentials (hardware_floor_ms): time / (tensor + exp) near 1 means the two units run one after the other."""
    keys = _cell_keys(records)
    d = _nearest(sorted({k[0] for k in keys}), want_d)
    n = _nearest(sorted({k[2] for k in keys if k[0] == d}), want_n)
    if d is None or n is None:
        return []
    lines = [f"summary at N={n} D={d}: time ratio ours / {sol_method} (ours vs {sol_method} TFLOP/s; "
             f"KL counts fwd 2 products, fwd+bwd 6; SDPA fwd 2, fwd+bwd 7)"]
    for causal in sorted({k[1] for k in keys}):
        parts = []
        for pass_name in PASSES:
            ours = _find(records, "ours", d, n, causal, pass_name)
            sol = _find(records, sol_method, d, n, causal, pass_name)
            ours_ok, sol_ok = bool(ours and ours.ok), bool(sol and sol.ok)
            ratio = f"{ours.time_ms / sol.time_ms:.2f}x" if ours_ok and sol_ok else "-"
            ours_tf = f"{ours.tflops:.3g}" if ours_ok else "-"
            sol_tf = f"{sol.tflops:.3g}" if sol_ok else "-"
            parts.append(f"{pass_name} {ratio} ({ours_tf} vs {sol_tf} TFLOP/s)")
        lines.append(f"  {'causal' if causal else 'full  '}: " + "; ".join(parts))
    if gpu is not None:
        lines += floor_lines(records, d, n, sol_method, gpu, batch, heads)
    return lines


def floor_lines(records, d: int, n: int, sol_method: str, gpu: Tuple[int, float], batch: int, heads: int) -> List[str]:
    """Time / (tensor + exp floor) and time / max(tensor, exp floor) of ours and the speed-of-light method."""
    sms, clock = gpu
    lines = [f"hardware floors at N={n} D={d} ({sms} SMs at {clock:.2f} GHz: {bm.TENSOR_FLOPS_PER_CLOCK_PER_SM} "
             f"tensor flops and {bm.EX2_PER_CLOCK_PER_SM} ex2 per clock per SM): time / (tensor + exp), "
             f"time / max(tensor, exp)"]
    for causal in sorted({k[1] for k in _cell_keys(records)}):
        parts = []
        for pass_name in PASSES:
            for method in ("ours", sol_method):
                r = _find(records, method, d, n, causal, pass_name)
                if not (r and r.ok):
                    continue
                t, e = bm.hardware_floor_ms(flops_for(method, pass_name, batch, heads, n, d, causal),
                                            exps_for(method, pass_name, batch, heads, n, causal), sms, clock)
                parts.append(f"{pass_name} {method} {r.time_ms / (t + e):.2f} / {r.time_ms / max(t, e):.2f} "
                             f"(T {t:.3g}, E {e:.3g} ms)")
        lines.append(f"  {'causal' if causal else 'full  '}: " + "; ".join(parts))
    return lines


def write_plot(records, path: str) -> bool:
    """PNG of median time vs N per method: one row per (D, mask), columns fwd and fwd+bwd. False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    groups = []
    for d, causal, _ in _cell_keys(records):
        if (d, causal) not in groups:
            groups.append((d, causal))
    fig, axes = plt.subplots(len(groups), len(PASSES), figsize=(11, 3.6 * len(groups)), squeeze=False)
    for row, (d, causal) in enumerate(groups):
        for col, pass_name in enumerate(PASSES):
            ax = axes[row][col]
            for i, method in enumerate(_methods_in(records)):
                pts = sorted((r.seqlen, r.time_ms) for r in records if r.ok and r.method == method and
                             r.head_dim == d and r.causal == causal and r.pass_name == pass_name)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel("median ms")
            ax.set_title(f"D={d} {'causal' if causal else 'full'} {pass_name}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(args, device, env: dict, records, out_dir: str, stem: str = "attention_bench",
                  plot: bool = True) -> None:
    """Write ``{stem}.json`` (and ``{stem}.png`` when ``plot`` and matplotlib imports) to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    config["device"] = device.type
    payload = {"config": config, "environment": env, "records": [dataclasses.asdict(r) for r in records]}
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {json_path}")
    if not plot:
        return
    png_path = os.path.join(out_dir, f"{stem}.png")
    if write_plot(records, png_path):
        print(f"wrote {png_path}")
    else:
        print("matplotlib not importable: no plot written")


def print_report(args, device, env: dict, records, elapsed: float) -> None:
    """Header, time table, memory table and the summary lines."""
    print(f"attention-KL benchmark on {env['device_name']} | torch {env['torch']} | streamkl {env['streamkl']} "
          f"(CUDA kernels: {'yes' if env['streamkl_cuda_kernels'] else 'no'}) | {elapsed:.0f} s")
    print(f"B={args.batch} H={args.heads} {args.dtype}, {args.divergence} KL, grads w.r.t. student q,k "
          f"(SDPA: q,k,v); chunk={args.chunk}; timing: {env['timing']}, median; memory: {env['memory']}")
    if env.get("cpu_load_note"):
        print(env["cpu_load_note"])
    print("\nmedian time, ms (fwd / fwd+bwd)")
    print(time_table(records))
    print("\npeak extra memory, GB (M = MiB) (fwd / fwd+bwd)")
    print(memory_table(records, args.batch, args.heads))
    problems = [r for r in records if not r.ok and not r.status.startswith(("skipped", "unavailable"))]
    if any(r.status.startswith("skipped") for r in records):
        print(f"\nskip = estimated above the {args.mem_limit_gb:.0f} GB limit (--mem-limit-gb; estimates "
              f"in the JSON); n/a = ours without CUDA kernels")
    for r in problems:
        print(f"{r.method} D={r.head_dim} N={r.seqlen} {'causal' if r.causal else 'full'} {r.pass_name}: "
              f"{r.status}")
    agreement = agreement_line(records)
    if agreement:
        print(agreement)
    sol = "sdpa_cudnn" if device.type == "cuda" else "sdpa_math"
    gpu = ((torch.cuda.get_device_properties(device).multi_processor_count, args.clock_ghz)
           if device.type == "cuda" else None)
    lines = summary(records, args.summary_n, args.summary_d, sol, gpu, args.batch, args.heads)
    if lines:
        print()
        print("\n".join(lines))


# ----------------------------------------------------------------------------------------------- main

def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--scenario", choices=("sweep",) + SCENARIOS, default="sweep",
                   help="sweep (default): the D x N x mask sweep below; gqa, varlen, dsa or all: the problem shapes "
                        "of bench/attention_scenarios.py (they use --device --quick --mask (gqa only) --dtype "
                        "--divergence --no-compile --rotate --repeats --mem-limit-gb --seed --out --quiet)")
    p.add_argument("--quick", action="store_true",
                   help="small subset: D=128, N in {4096, 8192} (CPU: H=2, D=64, N in {256, 512})")
    p.add_argument("--dims", type=_int_list, help="head dims, e.g. '64,128' (default 64,128)")
    p.add_argument("--seqlens", type=_int_list,
                   help="sequence lengths, e.g. '1024,4096' (default 1024,4096,8192,16384,32768)")
    p.add_argument("--mask", choices=("both", "full", "causal"), default="both",
                   help="non-causal ('full'), causal, or both (default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="default 16 (CPU --quick: 2)")
    p.add_argument("--dtype", help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--divergence", choices=("forward", "reverse"), default="forward")
    p.add_argument("--methods", type=lambda s: s.replace(",", " ").split(),
                   help="subset of: ours eager compile chunked sdpa_cudnn sdpa_flash (CPU: sdpa_math)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--chunk", type=int, default=1024, help="query rows per chunk of the chunked baseline")
    p.add_argument("--rotate", type=int, default=2, help="input sets rotated between timed calls (KL methods)")
    p.add_argument("--repeats", type=int, help="timed calls per cell (GPU: at least this many, default 10; "
                                               "CPU default 3)")
    p.add_argument("--mem-limit-gb", type=float, help="skip cells estimated above this (GPU default 75; CPU: "
                                                      "80%% of available memory)")
    p.add_argument("--summary-n", type=int, default=8192, help="N of the summary line (nearest measured)")
    p.add_argument("--summary-d", type=int, default=128, help="D of the summary line (nearest measured)")
    p.add_argument("--clock-ghz", type=float, default=1.83,
                   help="SM clock of the hardware-floor lines (1.83: the clock of the H100's 989 TFLOP/s; under "
                        "load the clock is often lower, which raises the floors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write attention_bench.json (and .png with matplotlib) here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display on stderr")
    return p


def resolve_device(args) -> torch.device:
    """``--device`` as a torch device (``auto``: cuda when torch sees one); stored back into ``args``."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/attention.py: --device cuda but torch sees no CUDA device")
    return torch.device(args.device)


def default_dtype_name(dtype: Optional[str], device) -> str:
    """``--dtype`` normalized, defaulting to bfloat16 on a GPU and float32 on the CPU."""
    return bm.dtype_name(bm.resolve_dtype(dtype or ("float32" if device.type == "cpu" else "bfloat16")))


def resolve_args(args) -> torch.device:
    """Apply device-dependent defaults of the sweep to ``args``; return the device."""
    device = resolve_device(args)
    cpu = device.type == "cpu"
    preset = (CPU_QUICK if cpu else QUICK) if args.quick else FULL
    args.dims = args.dims or preset["dims"]
    args.seqlens = args.seqlens or preset["seqlens"]
    args.heads = args.heads or (preset.get("heads", 16) if cpu else 16)
    args.dtype = default_dtype_name(args.dtype, device)
    args.causal_modes = MASK_MODES[args.mask]
    available = KL_METHODS + tuple(CPU_SDPA if cpu else GPU_SDPA)
    methods = args.methods or list(available)
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise SystemExit(f"bench/attention.py: unknown method(s) {unknown} on {device.type}; choose from "
                         f"{list(available)}")
    if args.no_compile:
        methods = [m for m in methods if m != "compile"]
    args.methods = methods
    return device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.scenario != "sweep":
        import attention_scenarios  # bench/ is on sys.path when this file runs as a script

        return attention_scenarios.main(args)
    device = resolve_args(args)
    if device.type == "cuda" and not streamkl.cuda_available():
        print("WARNING: streamkl has no CUDA kernels compiled in; 'ours' is reported as n/a, baselines still run.",
              file=sys.stderr)
    env = bm.environment_info(device)
    sweep = Sweep(args, device)
    args.mem_limit_gb = sweep.mem_limit / GB  # the limit in force, for the report and the JSON
    progress = bm.Progress(sweep.total_steps(), enabled=not args.quiet)
    start = time.perf_counter()
    records = sweep.run(progress)
    progress.close()
    elapsed = time.perf_counter() - start
    if args.out:
        write_outputs(args, device, env, records, args.out)
    print_report(args, device, env, records, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
