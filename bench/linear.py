#!/usr/bin/env python
"""Hidden-state logit-distillation benchmark: streamkl.linear_kl against the baselines, in one run.

For each number of tokens T (default bf16, V = 152064 (Qwen2), D_s = 3584, D_t = 5120, T in {1k, 4k, 8k,
16k}) it measures the forward+backward (loss, then gradients w.r.t. the student's x_s and w_s; the teacher is
detached, as in distillation) and the forward alone (student requiring grad) of:

    ours           streamkl.linear_kl (streaming over vocabulary tiles: O(T) extra memory on the CPU; on CUDA
                   the interim cuBLAS + StreamKL-epilogue design, O(T) plus chunk workspaces within
                   --workspace-mb, exported as STREAMKL_LINEAR_WORKSPACE_MB)
    eager          full [T, V] logits in eager PyTorch (bench/linear_baselines.py)
    compile        torch.compile of eager
    chunked        vocabulary-chunked torch.compile'd PyTorch (the Nitrobrew approach; forward KL only)
    liger          Liger-Kernel LigerFusedLinearJSD (jsd_beta 0 = forward KL)
    liger_chunked  Liger-Kernel LigerFusedLinearJSDLoss (chunked distillation loss, soft loss only)

Each cell records the median time (ms; triton.testing.do_bench on CUDA when available, else CUDA events;
time.perf_counter medians on the CPU), the peak extra memory (bytes allocated above what was allocated when
the call started, so inputs do not count), and the forward loss's difference from ours. Cells whose estimated
footprint exceeds --mem-limit-gb are skipped, OOMs are caught, and a method that cannot run here (no GPU for
Liger, liger-kernel missing) is reported with the reason.

Examples:
    python bench/linear.py --out bench/results/                 # the full sweep (GPU)
    python bench/linear.py --tokens 4096 --methods ours,liger   # one cell, two methods
    python bench/linear.py --quick --device cpu                 # tiny CPU smoke test
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import streamkl
except ImportError:  # a source checkout without `pip install -e .`: use the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamkl
import linear_baselines as baselines  # noqa: E402
from streamkl import benchmark as bm  # noqa: E402

METHODS = ("ours", "eager", "compile", "chunked", "liger", "liger_chunked")
WORKSPACE_ENV, DEFAULT_WORKSPACE_MB = "STREAMKL_LINEAR_WORKSPACE_MB", 512.0  # csrc/cuda/linear_vocab_chunks.h
PASSES = ("fwd", "fwd+bwd")
GB = 1e9

FULL = dict(tokens=[1024, 4096, 8192, 16384], vocab=152064, dim_s=3584, dim_t=5120, dtype="bfloat16")
CPU_QUICK = dict(tokens=[64, 256], vocab=4096, dim_s=64, dim_t=96, dtype="float32")


@dataclasses.dataclass
class Record:
    """One measured (or skipped) cell."""
    method: str
    tokens: int
    pass_name: str
    status: str = "ok"
    time_ms: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    loss_diff_vs_ours: Optional[float] = None
    estimated_bytes: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def estimated_bytes(method: str, pass_name: str, tokens: int, vocab: int, elem: int) -> int:
    """Rough peak extra bytes, to skip cells that cannot fit. Per [T, V] logit element: eager keeps both
    logits in the input dtype and ~5 fp32 maps forward (~7 with the backward); torch.compile about one fp32
    map forward, two with the backward. The streaming and chunked methods are far below the inputs' size."""
    per = (2 * elem + (20 if pass_name == "fwd" else 28)) if method == "eager" else \
        (4 if pass_name == "fwd" else 8) if method == "compile" else 0
    return tokens * vocab * per


def make_inputs(tokens, vocab, dim_s, dim_t, dtype, device, seed):
    """x_s [T, D_s], w_s [V, D_s] (both require grad), x_t [T, D_t], w_t [V, D_t] (detached), labels [T]:
    normal inputs with weights scaled by 1/sqrt(D) (logits of unit scale, LM-like), 5% ignored labels."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    x_s, w_s = randn(tokens, dim_s), randn(vocab, dim_s, scale=dim_s ** -0.5)
    x_t, w_t = randn(tokens, dim_t), randn(vocab, dim_t, scale=dim_t ** -0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    labels[torch.rand(tokens, generator=g, device=device) < 0.05] = -100
    return x_s.requires_grad_(), w_s.requires_grad_(), x_t, w_t, labels


class Sweep:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.dtype = bm.resolve_dtype(args.dtype)
        self.records: List[Record] = []
        self.unavailable = {m: self._unavailable(m) for m in args.methods}

    def _unavailable(self, method) -> Optional[str]:
        if method == "ours" and self.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "streamkl::linear_kl_fwd", "CUDA"):
            return "unavailable (no CUDA kernel for linear_kl in this build)"
        if method.startswith("liger"):
            reason = baselines.liger_unavailable_reason(self.device)
            return f"unavailable ({reason})" if reason else None
        if method == "chunked" and self.args.divergence != "forward":
            return "unavailable (the chunked baseline implements forward KL only)"
        return None

    def _function(self, method) -> Callable:
        if method == "ours":
            return streamkl.linear_kl
        if method == "eager":
            return baselines.eager_linear_kl
        if method == "compile":
            return baselines.compiled_linear_kl()
        if method == "chunked":
            return baselines.chunked_linear_kl_factory(self.args.chunk, compile_steps=not self.args.no_compile)
        if method == "liger":
            return baselines.liger_fused_linear_jsd_factory()
        if method == "liger_chunked":
            return baselines.liger_chunked_jsd_factory()
        raise ValueError(method)

    def run(self, progress) -> List[Record]:
        a = self.args
        for tokens in a.tokens:
            inputs = make_inputs(tokens, a.vocab, a.dim_s, a.dim_t, self.dtype, self.device, a.seed)
            ours_loss = None
            for method in a.methods:
                fn = None
                for pass_name in PASSES:
                    progress.step(f"T={tokens} {method} {pass_name}")
                    record = Record(method, tokens, pass_name)
                    self.records.append(record)
                    if self.unavailable[method]:
                        record.status = self.unavailable[method]
                        continue
                    record.estimated_bytes = estimated_bytes(method, pass_name, tokens, a.vocab, self.dtype.itemsize)
                    if record.estimated_bytes > a.mem_limit_gb * GB:
                        record.status = f"skipped (est. {record.estimated_bytes / GB:.0f} GB)"
                        continue
                    fn = fn or self._function(method)
                    loss = self._measure(record, fn, inputs)
                    if loss is not None and pass_name == "fwd":
                        if method == "ours":
                            ours_loss = loss
                        elif ours_loss is not None:
                            record.loss_diff_vs_ours = abs(loss - ours_loss)
            del inputs
            bm.free_memory(self.device)
        return self.records

    def _measure(self, record: Record, fn: Callable, inputs) -> Optional[float]:
        a = self.args
        x_s, w_s, x_t, w_t, labels = inputs
        kwargs = dict(divergence=a.divergence, beta=a.beta, temperature=a.temperature, labels=labels)

        def forward():
            return fn(x_s, w_s, x_t, w_t, **kwargs).detach()

        def forward_backward():
            return torch.autograd.grad(fn(x_s, w_s, x_t, w_t, **kwargs), (x_s, w_s))

        step = forward if record.pass_name == "fwd" else forward_backward
        try:
            step()  # warm-up: compiles, autotunes
            record.peak_extra_bytes, out = bm.peak_extra_memory(step, self.device)
            # The gradients every method returns (dx_s, dW_s: 1.1 GB at V=152064, D_s=3584) are results, not
            # working memory: the memory table reports the peak beyond them.
            results = out if isinstance(out, tuple) else ()
            record.peak_extra_bytes -= sum(t.numel() * t.element_size() for t in results)
            record.time_ms = bm.time_fn(step, self.device, repeats=a.repeats, warmup=0)
            return float(out) if record.pass_name == "fwd" else None
        except Exception as exc:  # noqa: BLE001  (one failing baseline must not end the sweep)
            text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            record.status = "OOM" if bm.is_oom(exc) else f"error: {type(exc).__name__}: {text}"
            if record.status != "OOM":
                print(f"\n{record.method} T={record.tokens} {record.pass_name}: {record.status}", file=sys.stderr)
            return None
        finally:
            bm.free_memory(self.device)


# ----------------------------------------------------------------------------------------------- reporting

def _cell(records, method, tokens, pass_name, what):
    r = next((r for r in records if (r.method, r.tokens, r.pass_name) == (method, tokens, pass_name)), None)
    if r is None:
        return "-"
    if not r.ok:
        return "skip" if r.status.startswith("skipped") else "n/a" if r.status.startswith("unavailable") else \
            "OOM" if r.status == "OOM" else "err"
    if what == "time":
        return bm.format_ms(r.time_ms)
    return f"{r.peak_extra_bytes / GB:.2f}" if r.peak_extra_bytes >= 0.01 * GB else \
        f"{r.peak_extra_bytes / 2 ** 20:.1f}M"


def table(records, methods, tokens_list, what) -> str:
    rows = [[str(t)] + [f"{_cell(records, m, t, 'fwd', what)} / {_cell(records, m, t, 'fwd+bwd', what)}"
                        for m in methods] for t in tokens_list]
    return bm.format_table(["T"] + list(methods), rows, align="r" * (len(methods) + 1))


def print_report(args, env, records, elapsed):
    print(f"linear-KL benchmark on {env['device_name']} | torch {env['torch']} | {elapsed:.0f} s")
    print(f"V={args.vocab} D_s={args.dim_s} D_t={args.dim_t} {args.dtype}, {args.divergence}"
          f"{f' (beta={args.beta})' if args.divergence == 'jsd' else ''} tau={args.temperature}, grads w.r.t. "
          f"x_s, w_s; timing: {env['timing']}, median; memory: {env['memory']}, minus the returned gradients")
    if args.device == "cuda":
        print(f"ours on CUDA: interim cuBLAS + StreamKL-epilogue design, chunk workspaces <= {args.workspace_mb:g} "
              f"MiB")
    print("\nmedian time, ms (fwd / fwd+bwd)")
    print(table(records, args.methods, args.tokens, "time"))
    print("\npeak extra memory, GB (M = MiB) (fwd / fwd+bwd)")
    print(table(records, args.methods, args.tokens, "memory"))
    for r in records:
        if not r.ok and not r.status.startswith("skipped") and r.pass_name == "fwd":
            print(f"{r.method} T={r.tokens}: {r.status}")
    diffs = [r.loss_diff_vs_ours for r in records if r.loss_diff_vs_ours is not None]
    if diffs:
        print(f"max |loss - ours| over all cells: {max(diffs):.2e}")


def write_outputs(args, device, env, records, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["device"] = device.type
    path = os.path.join(out_dir, "linear_bench.json")
    with open(path, "w") as f:
        json.dump({"config": config, "environment": env, "records": [dataclasses.asdict(r) for r in records]}, f,
                  indent=2)
    print(f"wrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("matplotlib not importable: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pass_name in zip(axes, PASSES):
        for i, method in enumerate(args.methods):
            pts = sorted((r.tokens, r.time_ms) for r in records if r.ok and r.method == method and
                         r.pass_name == pass_name)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=f"C{i}")
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="median ms", title=pass_name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out_dir, "linear_bench.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    ints = lambda s: [int(x) for x in s.replace(",", " ").split()]  # noqa: E731
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="CPU: T in {64, 256}, V=4096, D 64/96, fp32; "
                                                        "GPU: T in {4096, 16384}")
    p.add_argument("--tokens", type=ints, help="T values (default 1024,4096,8192,16384)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--dim-s", type=int)
    p.add_argument("--dim-t", type=int)
    p.add_argument("--dtype")
    p.add_argument("--divergence", choices=("forward", "reverse", "jsd"), default="forward")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--methods", type=lambda s: s.replace(",", " ").split(), default=list(METHODS))
    p.add_argument("--no-compile", action="store_true", help="leave out compile; chunked runs uncompiled")
    p.add_argument("--chunk", type=int, default=8192, help="vocabulary chunk of the chunked baseline")
    p.add_argument("--repeats", type=int, help="timed calls (GPU: at least this many; CPU default 3)")
    p.add_argument("--mem-limit-gb", type=float, help="skip cells estimated above this (GPU default 75)")
    p.add_argument("--workspace-mb", type=float,
                   help="ours on CUDA: budget of the vocabulary-chunk workspaces in MiB (sets "
                        "STREAMKL_LINEAR_WORKSPACE_MB; default: the environment's value, else 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write linear_bench.json (and .png with matplotlib) here")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def resolve_args(args) -> torch.device:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    preset = CPU_QUICK if (args.quick and device.type == "cpu") else FULL
    if args.quick and device.type == "cuda":
        preset = dict(FULL, tokens=[4096, 16384])
    args.tokens = args.tokens or preset["tokens"]
    for key in ("vocab", "dim_s", "dim_t", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench/linear.py: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.no_compile:
        args.methods = [m for m in args.methods if m != "compile"]
    if args.workspace_mb is not None:
        os.environ[WORKSPACE_ENV] = str(args.workspace_mb)
    args.workspace_mb = float(os.environ.get(WORKSPACE_ENV, DEFAULT_WORKSPACE_MB))
    if args.mem_limit_gb is None:
        free = bm.available_memory_bytes(device)
        args.mem_limit_gb = 75.0 if device.type == "cuda" else (0.8 * free / GB if free else 8.0)
    return device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_args(args)
    env = bm.environment_info(device)
    sweep = Sweep(args, device)
    progress = bm.Progress(len(args.tokens) * len(args.methods) * len(PASSES), enabled=not args.quiet)
    start = time.perf_counter()
    records = sweep.run(progress)
    progress.close()
    if args.out:
        write_outputs(args, device, env, records, args.out)
    print_report(args, env, records, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
