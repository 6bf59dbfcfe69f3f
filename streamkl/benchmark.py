"""Shared timing and memory helpers for ``python -m streamkl bench`` and ``bench/*.py``.

Everything here is plain PyTorch + the standard library; triton is used only when it imports.

Timing
    * GPU: ``triton.testing.do_bench(..., return_mode="median")`` when triton is importable, else CUDA events
      (warm-up, then the median of many individually timed runs). Times are in milliseconds.
    * CPU: ``time.perf_counter`` around each call, median of ``repeats`` calls after ``warmup`` calls.

Peak extra memory (bytes above what was allocated when the measured call started, so inputs do not count)
    * GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the allocation at
      the start of the call.
    * CPU: peak resident-set growth, sampled by a background thread that reads ``/proc/self/statm`` about every
      millisecond. Where ``/proc`` is missing, ``resource.getrusage`` gives the growth of the lifetime peak RSS,
      which is only a lower bound (0 when an earlier call peaked higher).

Inputs are always random normal (never zeros, which would make every softmax uniform) and can be rotated
between several independent sets so no call sees the exact tensors of the previous one.
"""

import ctypes
import gc
import itertools
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


# ----------------------------------------------------------------------------------------------- inputs

def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name such as ``"bf16"`` or ``"float32"`` to a ``torch.dtype``."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Short printable name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


def make_input_sets(shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device, *, seed: int = 0,
                    n_grad: int = 2, n_sets: int = 1) -> List[Tuple[torch.Tensor, ...]]:
    """``n_sets`` independent random tuples of tensors with the given ``shapes`` (standard normal, never zeros).

    The first ``n_grad`` tensors of each tuple require grad (the student's ``q_s, k_s``); the rest are detached
    (the teacher, as in distillation). Any shapes: GQA key heads, packed varlen tokens, different head dims.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        tensors = [torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
                   for shape in shapes]
        for t in tensors[:n_grad]:
            t.requires_grad_(True)
        sets.append(tuple(tensors))
    return sets


def make_attention_inputs(batch: int, heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
                          device, *, seed: int = 0, student_grad: bool = True,
                          n_sets: int = 1) -> List[Tuple[torch.Tensor, ...]]:
    """``n_sets`` independent random ``(q_s, k_s, q_t, k_t)`` tuples of shape ``[B, H, N, D]``.

    Student ``q_s, k_s`` require grad when ``student_grad``; the teacher is always detached, as in
    distillation. Values are standard normal (never zeros).
    """
    shape = (batch, heads, seqlen, head_dim)
    return make_input_sets([shape] * 4, dtype, device, seed=seed, n_grad=2 if student_grad else 0,
                           n_sets=n_sets)


class Rotation:
    """Cycles through a list of input sets; ``next()`` returns the following one."""

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self._cycle = itertools.cycle(self.sets)

    def next(self):
        """The next input set (wraps around)."""
        return next(self._cycle)

    def first(self):
        """The first input set (does not advance the rotation)."""
        return self.sets[0]


def forward_step(fn: Callable, rotation: Rotation, **kwargs) -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``fn(*inputs, **kwargs)`` on the next input set.

    Returns the output detached, so a caller that keeps it does not keep the autograd graph (and the
    tensors it saved for backward) alive.
    """
    def step():
        return fn(*rotation.next(), **kwargs).detach()
    return step


def forward_backward_step(fn: Callable, rotation: Rotation, n_grad: int = 2, **kwargs) -> Callable[[], tuple]:
    """A no-argument callable: forward, ``.sum()``, and gradients w.r.t. the first ``n_grad`` inputs.

    Uses ``torch.autograd.grad`` so nothing accumulates into ``.grad`` between timed calls. Returns the
    gradients.
    """
    def step():
        inputs = rotation.next()
        out = fn(*inputs, **kwargs)
        return torch.autograd.grad(out.sum(), inputs[:n_grad])
    return step


# ----------------------------------------------------------------------------------------------- timing

def triton_do_bench():
    """``triton.testing.do_bench`` if triton imports, else ``None``."""
    try:
        from triton.testing import do_bench
    except Exception:  # ImportError, or a triton that fails to initialise
        return None
    return do_bench


def time_cpu(fn: Callable, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _estimate_cuda_ms(fn: Callable, calls: int = 3) -> float:
    """Rough per-call time of ``fn`` in ms (mean of a few back-to-back calls; also warms up)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end) / calls, 1e-3)


def time_cuda_events(fn: Callable, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                     min_repeats: int = 10, max_repeats: int = 1000) -> float:
    """Median GPU time of ``fn()`` in ms with one CUDA event pair per call (the fallback without triton)."""
    estimate = _estimate_cuda_ms(fn)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = int(min(max_repeats, max(min_repeats, rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cuda(fn: Callable, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_repeats: int = 10) -> float:
    """Median GPU time of ``fn()`` in ms: ``triton.testing.do_bench`` when available, else CUDA events.

    ``min_repeats`` raises the time budget so that at least that many calls are timed.
    """
    do_bench = triton_do_bench()
    if do_bench is None:
        return time_cuda_events(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, min_repeats=min_repeats)
    estimate = _estimate_cuda_ms(fn)
    rep_ms = max(rep_ms, min_repeats * estimate)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_fn(fn: Callable, device, *, repeats: Optional[int] = None, warmup: int = 1) -> float:
    """Median time of ``fn()`` in ms on ``device``.

    CPU: ``repeats`` timed calls (default 3) after ``warmup`` calls. CUDA: as many calls as fit in ~100 ms,
    at least ``repeats`` (default 10).
    """
    if torch.device(device).type == "cuda":
        return time_cuda(fn, min_repeats=10 if repeats is None else repeats)
    return time_cpu(fn, warmup=warmup, repeats=3 if repeats is None else repeats)


def timing_method(device) -> str:
    """Human-readable description of how :func:`time_fn` times on ``device``."""
    if torch.device(device).type == "cuda":
        return "triton.testing.do_bench" if triton_do_bench() is not None else "CUDA events"
    return "time.perf_counter"


# ----------------------------------------------------------------------------------------------- memory

def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def _read_statm_rss(path: str = "/proc/self/statm") -> Optional[int]:
    """Resident set size in bytes from ``/proc/self/statm``, or ``None`` if unreadable."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        return None


def _getrusage_peak_rss() -> Optional[int]:
    """Lifetime peak RSS in bytes from ``resource.getrusage`` (KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_cpu_memory() -> None:
    """Best effort to return freed heap memory to the OS (``gc.collect`` + glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSSSampler:
    """Context manager that records the peak RSS growth while it is active.

    A daemon thread reads ``/proc/self/statm`` every ``interval`` seconds. Use ``.peak_extra`` (bytes) after
    the ``with`` block. Falls back to ``resource.getrusage`` (a lower bound) when ``/proc`` is unavailable.
    """

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak_extra = 0
        self.method = "/proc/self/statm sampling"
        self._stop = threading.Event()
        self._thread = None
        self._baseline = 0
        self._peak = 0

    def _sample(self) -> None:
        rss = _read_statm_rss()
        if rss is not None and rss > self._peak:
            self._peak = rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        release_cpu_memory()
        rss = _read_statm_rss()
        if rss is None:
            self.method = "resource.getrusage (lower bound)"
            self._baseline = _getrusage_peak_rss() or 0
            return self
        self._baseline = self._peak = rss
        self._thread = threading.Thread(target=self._run, name="streamkl-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak_extra = max(0, (_getrusage_peak_rss() or 0) - self._baseline)
            return False
        self._sample()
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(0, self._peak - self._baseline)
        return False


def cpu_peak_extra(fn: Callable) -> Tuple[int, object]:
    """Run ``fn()`` once; return (peak RSS growth in bytes, ``fn``'s result)."""
    with PeakRSSSampler() as sampler:
        result = fn()
    return sampler.peak_extra, result


def cuda_peak_extra(fn: Callable) -> Tuple[int, object]:
    """Run ``fn()`` once; return (peak CUDA allocation above the starting allocation in bytes, result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline, result


def peak_extra_memory(fn: Callable, device) -> Tuple[int, object]:
    """Peak extra memory of one ``fn()`` call on ``device`` (see the module docstring) and its result."""
    if torch.device(device).type == "cuda":
        return cuda_peak_extra(fn)
    return cpu_peak_extra(fn)


def memory_method(device) -> str:
    """Human-readable description of how :func:`peak_extra_memory` measures on ``device``."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated above the starting allocation"
    if _read_statm_rss() is not None:
        return "peak RSS growth (/proc/self/statm sampled every ~1 ms)"
    return "peak RSS growth (resource.getrusage, lower bound)"


def available_memory_bytes(device) -> Optional[int]:
    """Free memory on ``device`` in bytes (GPU: ``mem_get_info``; CPU: ``MemAvailable``), ``None`` if unknown."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is an out-of-memory error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(exc).lower()
        if "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_memory(device) -> None:
    """Collect garbage and release cached memory on ``device`` (call after an OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        release_cpu_memory()


# ----------------------------------------------------------------------------------------------- numbers

def attention_flops(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, *, causal: bool,
                    products: int) -> float:
    """Flops of ``products`` ``[n_q, D] x [D, n_k]``-sized matrix products per head (2 flops per MAC).

    Causal counts half the score matrix (the usual FlashAttention convention).
    """
    flops = products * 2.0 * batch * heads * n_q * n_k * head_dim
    return flops / 2 if causal else flops


# Hopper (H100/H200) per-SM rates: dense bf16/fp16 tensor-core flops (989 TFLOP/s = 132 SMs x 4096 x 1.83 GHz) and the
# MUFU unit's ex2 (16 per clock per SM). Both scale with the SM clock.
TENSOR_FLOPS_PER_CLOCK_PER_SM = 4096
EX2_PER_CLOCK_PER_SM = 16


def hardware_floor_ms(flops: float, exps: float, sms: int, clock_ghz: float) -> Tuple[float, float]:
    """(tensor_ms, exp_ms): the time ``flops`` of tensor-core work and ``exps`` exponentials take at the peak rates of
    ``sms`` SMs at ``clock_ghz``. A kernel that overlaps the two perfectly needs max of them; one that does not, their
    sum."""
    clocks_per_ms = sms * clock_ghz * 1e6
    return (flops / (TENSOR_FLOPS_PER_CLOCK_PER_SM * clocks_per_ms), exps / (EX2_PER_CLOCK_PER_SM * clocks_per_ms))


def format_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_ms(ms: Optional[float]) -> str:
    """Milliseconds with about three significant digits; ``None`` -> ``"-"``."""
    if ms is None or not math.isfinite(ms):
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """Plain-text table; ``align`` is one ``l``/``r`` per column (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


# ----------------------------------------------------------------------------------------------- environment

def cpu_name() -> str:
    """CPU model from ``/proc/cpuinfo`` (or ``platform.processor()``) with the usable core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({usable_cores()} cores, {torch.get_num_threads()} torch threads)"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_load_note() -> Optional[str]:
    """A warning when the 1-minute load average says other work shares the CPU, else ``None``.

    With torch's intra-op threads on every core, one busy neighbour makes each parallel op wait for a
    preempted thread, and CPU timings swing by 10x or more.
    """
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cores = usable_cores()
    if load < 0.5 * cores:
        return None
    return (f"note: the CPU is shared (1-minute load {load:.1f} on {cores} cores when the run started); "
            f"CPU timings will be noisy")


def device_name(device) -> str:
    """Name of the GPU for a CUDA device, else the CPU description."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment_info(device) -> dict:
    """Versions and device facts recorded next to every benchmark result."""
    import streamkl

    info = {
        "streamkl": streamkl.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "streamkl_cuda_kernels": streamkl.cuda_available(),
        "device": str(device),
        "device_name": device_name(device),
        "timing": timing_method(device),
        "memory": memory_method(device),
        "cpu_load_note": cpu_load_note() if torch.device(device).type == "cpu" else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


# ----------------------------------------------------------------------------------------------- progress

class Progress:
    """A one-line status on stderr: ``[3/8] eager fwd+bwd ... (12.3 s)``.

    Rewrites the line in place on a terminal; prints one line per step otherwise (logs, CI). ``enabled=False``
    silences it.
    """

    def __init__(self, total: int, *, stream=None, enabled: bool = True):
        self.total = total
        self.count = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._width = 0

    def step(self, message: str) -> None:
        """Announce the next step."""
        self.count += 1
        self._write(f"[{self.count}/{self.total}] {message} ...")

    def note(self, message: str) -> None:
        """Update the current line without counting a step."""
        self._write(f"[{self.count}/{self.total}] {message}")

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        text = f"{text} ({time.perf_counter() - self.start:.1f} s)"
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, message: str = "done") -> None:
        """Finish the status line."""
        if not self.enabled:
            return
        self._write(f"[{self.count}/{self.total}] {message}")
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
