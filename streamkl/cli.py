"""Command-line interface: ``python -m streamkl {bench,info}``.

``bench`` times StreamKL's ``attention_kl`` against the eager PyTorch materializing reference
(``attention_kl_reference(..., dtype=None)``) on one problem and prints forward / forward+backward median
times, peak extra memory and the max abs difference from a float64 reference. ``info`` prints versions and
whether the CUDA kernels were compiled in.
"""

import argparse
import functools
import json
import sys
from typing import Optional

import torch

from . import __version__, attention_kl, attention_kl_reference, cuda_available
from . import benchmark as bm

GPU_DEFAULTS = dict(batch=1, heads=16, seqlen=4096, head_dim=128, dtype="bfloat16")
CPU_DEFAULTS = dict(batch=1, heads=4, seqlen=2048, head_dim=64, dtype="float32")
METHODS = (("ours", "streamkl (ours)"), ("eager", "eager PyTorch"))
PASSES = ("fwd", "fwd+bwd")
# Bytes per [B, H, N, N] element held by the float64 check (scores, log-softmaxes, products), generously.
FP64_CHECK_BYTES_PER_SCORE = 6 * 8


def _warn(message: str) -> None:
    """Print a loud multi-line warning on stderr."""
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    """``python -m streamkl info``: versions, CUDA kernels compiled or not, device names."""
    rows = [
        ("streamkl", __version__),
        ("torch", torch.__version__),
        ("torch CUDA runtime", torch.version.cuda or "none (CPU-only torch)"),
        ("streamkl CUDA kernels", "compiled in" if cuda_available() else "not compiled in"),
        ("CUDA device visible", "yes" if torch.cuda.is_available() else "no"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name} (sm_{props.major}{props.minor}, "
                                      f"{bm.format_bytes(props.total_memory)})"))
    rows.append(("cpu", bm.cpu_name()))
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except Exception:
        rows.append(("triton", "not importable"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


# ----------------------------------------------------------------------------------------------- bench

def resolve_device(requested: str) -> torch.device:
    """Pick the bench device; warn loudly when a GPU is present but the CUDA kernels are not compiled in."""
    gpu = torch.cuda.is_available()
    kernels = cuda_available()
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not gpu:
            raise SystemExit("streamkl bench: --device cuda requested but torch sees no CUDA device")
        if not kernels:
            raise SystemExit("streamkl bench: --device cuda requested but this streamkl build has no CUDA kernels "
                             "(rebuild with a CUDA toolkit: CUDA_HOME set, torch built with CUDA, then "
                             "`pip install --no-build-isolation -e .`)")
        return torch.device("cuda")
    if gpu and kernels:
        return torch.device("cuda")
    if gpu:
        _warn(f"WARNING: a CUDA GPU is present ({torch.cuda.get_device_name(0)}) but this streamkl build has NO\n"
              "CUDA kernels compiled in. Benchmarking on the CPU instead; the numbers below say nothing about\n"
              "GPU performance. Rebuild with CUDA_HOME set (torch.version.cuda=%s) to get the GPU kernels."
              % torch.version.cuda)
    return torch.device("cpu")


def fill_defaults(args, device: torch.device) -> None:
    """Fill unset problem sizes and dtype from the device's default problem."""
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _methods(args):
    """The two functions compared, with the options of this run bound."""
    options = dict(causal=args.causal, divergence=args.divergence)
    return {
        "ours": functools.partial(attention_kl, **options),
        "eager": functools.partial(attention_kl_reference, dtype=None, **options),
    }


def measure_pass(fn, sets, device, pass_name: str, repeats: Optional[int]) -> dict:
    """Peak extra memory (first call, doubling as warm-up) and median time of one pass of ``fn``.

    Returns a dict with ``time_ms``, ``peak_extra_bytes``, ``status`` and ``output`` (the result of the first
    call, on input set 0), or ``status="OOM"``.
    """
    rotation = bm.Rotation(sets)
    step = (bm.forward_step(fn, rotation) if pass_name == "fwd"
            else bm.forward_backward_step(fn, rotation, n_grad=2))
    try:
        peak, output = bm.peak_extra_memory(step, device)
        time_ms = bm.time_fn(step, device, repeats=repeats, warmup=0)
    except Exception as exc:  # noqa: BLE001  (OOM is reported, anything else re-raised)
        if not bm.is_oom(exc):
            raise
        result = {"status": "OOM", "time_ms": None, "peak_extra_bytes": None, "output": None}
    else:
        return {"status": "ok", "time_ms": time_ms, "peak_extra_bytes": peak, "output": output}
    bm.free_memory(device)
    return result


def fp64_check(args, sets, outputs: dict, device) -> dict:
    """Max abs difference of each method's forward output (input set 0) from the float64 reference."""
    rows = args.batch * args.heads * args.seqlen * args.seqlen
    need = rows * FP64_CHECK_BYTES_PER_SCORE
    free = bm.available_memory_bytes(device)
    if free is not None and need > 0.8 * free:
        return {"status": f"skipped (needs ~{bm.format_bytes(need)})"}
    q_s, k_s, q_t, k_t = (t.detach() for t in sets[0])
    with torch.no_grad():
        ref = attention_kl_reference(q_s, k_s, q_t, k_t, causal=args.causal, divergence=args.divergence,
                                     dtype=torch.float64)
    check = {"status": "ok"}
    for name, out in outputs.items():
        check[name] = None if out is None else (out.double() - ref).abs().max().item()
    return check


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    """``a / b`` as ``"2.35x"`` (three significant digits up to 999x); ``"-"`` when either is missing."""
    if not a or not b:
        return "-"
    r = a / b
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def format_report(args, device, env: dict, results: dict, check: dict) -> str:
    """The human-readable bench report (header lines + table)."""
    mode = "causal" if args.causal else "non-causal"
    reps = "median of %s calls" % (args.repeats or (3 if device.type == "cpu" else ">=10 (~100 ms)"))
    lines = [
        f"streamkl {env['streamkl']} bench on {device.type}: {env['device_name']}",
        f"torch {env['torch']}, streamkl CUDA kernels: {'yes' if env['streamkl_cuda_kernels'] else 'no'}",
        f"problem: B={args.batch} H={args.heads} N={args.seqlen} D={args.head_dim} {args.dtype}, {mode}, "
        f"{args.divergence} KL; student q,k require grad, teacher detached",
        f"timing: {env['timing']}, {reps}; memory: {env['memory']}",
    ]
    if env.get("cpu_load_note"):
        lines.append(env["cpu_load_note"])
    lines.append("")
    headers = ["method", "fwd ms", "fwd+bwd ms", "peak extra fwd", "peak extra fwd+bwd", "max |KL - fp64 ref|"]
    rows = []
    for key, label in METHODS:
        fwd, fb = results[key]["fwd"], results[key]["fwd+bwd"]
        diff = check.get(key)
        rows.append([label,
                     bm.format_ms(fwd["time_ms"]) if fwd["status"] == "ok" else fwd["status"],
                     bm.format_ms(fb["time_ms"]) if fb["status"] == "ok" else fb["status"],
                     bm.format_bytes(fwd["peak_extra_bytes"]), bm.format_bytes(fb["peak_extra_bytes"]),
                     "-" if diff is None else f"{diff:.2e}"])
    ours, eager = results["ours"], results["eager"]
    rows.append(["eager / ours (>1: ours better)",
                 _ratio(eager["fwd"]["time_ms"], ours["fwd"]["time_ms"]),
                 _ratio(eager["fwd+bwd"]["time_ms"], ours["fwd+bwd"]["time_ms"]),
                 _ratio(eager["fwd"]["peak_extra_bytes"], ours["fwd"]["peak_extra_bytes"]),
                 _ratio(eager["fwd+bwd"]["peak_extra_bytes"], ours["fwd+bwd"]["peak_extra_bytes"]),
                 ""])
    lines.append(bm.format_table(headers, rows))
    if check.get("status") != "ok":
        lines.append(f"float64 check: {check.get('status')}")
    return "\n".join(lines)


def json_report(args, device, env: dict, results: dict, check: dict) -> dict:
    """The machine-readable bench report written by ``--json``."""
    config = {k: getattr(args, k) for k in ("batch", "heads", "seqlen", "head_dim", "dtype", "causal",
                                            "divergence", "repeats")}
    config["device"] = device.type
    clean = {m: {p: {k: v for k, v in r.items() if k != "output"} for p, r in passes.items()}
             for m, passes in results.items()}
    return {"config": config, "environment": env, "results": clean, "fp64_check": check}


def cmd_bench(args) -> int:
    """``python -m streamkl bench``: ours vs eager PyTorch, fwd and fwd+bwd, time and peak memory."""
    device = resolve_device(args.device)
    fill_defaults(args, device)
    dtype = bm.resolve_dtype(args.dtype)
    args.dtype = bm.dtype_name(dtype)
    env = bm.environment_info(device)
    progress = bm.Progress(len(METHODS) * len(PASSES) + 1, enabled=not args.quiet)
    sets = bm.make_attention_inputs(args.batch, args.heads, args.seqlen, args.head_dim, dtype, device,
                                    seed=args.seed, n_sets=2)
    results, outputs = {}, {}
    for key, fn in _methods(args).items():
        results[key] = {}
        for pass_name in PASSES:
            progress.step(f"{key} {pass_name}")
            result = measure_pass(fn, sets, device, pass_name, args.repeats)
            if pass_name == "fwd":
                outputs[key] = result["output"]
            result.pop("output")
            results[key][pass_name] = result
    progress.step("float64 reference check")
    check = fp64_check(args, sets, outputs, device)
    progress.close()
    print(format_report(args, device, env, results, check))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_report(args, device, env, results, check), f, indent=2)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------- parser

def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m streamkl`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m streamkl",
        description="StreamKL command line: benchmark attention KL against eager PyTorch, print build info.")
    parser.add_argument("--version", action="version", version=f"streamkl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info}")

    info = sub.add_parser("info", help="print versions, whether CUDA kernels are compiled in, device names")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench", help="time streamkl.attention_kl against eager PyTorch (fwd, fwd+bwd, peak memory)",
        description="Time streamkl.attention_kl against the eager PyTorch reference (attention_kl_reference "
                    "with dtype=None). Defaults: GPU B=1 H=16 N=4096 D=128 bfloat16 when the CUDA kernels "
                    "are compiled in, else CPU B=1 H=4 N=2048 D=64 float32.")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA when a GPU is visible and the CUDA kernels are compiled in, else CPU")
    bench.add_argument("--batch", "-b", type=_positive_int, help="batch size B")
    bench.add_argument("--heads", type=_positive_int, help="heads H")
    bench.add_argument("--seqlen", "-n", type=_positive_int, help="sequence length N (queries = keys)")
    bench.add_argument("--head-dim", "-d", type=_positive_int, dest="head_dim", help="head dim D")
    bench.add_argument("--dtype", help="float32, bfloat16, float16 or float64")
    bench.add_argument("--causal", action="store_true", help="causal mask")
    bench.add_argument("--divergence", choices=("forward", "reverse"), default="forward")
    bench.add_argument("--repeats", type=_positive_int,
                       help="timed calls per measurement (CPU default 3; GPU: at least this many, default 10)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--quiet", "-q", action="store_true", help="no progress display on stderr")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    """Entry point of ``python -m streamkl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except ValueError as exc:
        parser.error(str(exc))
        return 2
