"""Attention-KL benchmark on the problem shapes users have beyond plain multi-head attention (issue 5).

Run through ``python bench/attention.py --scenario gqa|varlen|dsa|all``; the D x N sweep stays in
bench/attention.py, whose cell runner, baselines, memory estimates and tables this module reuses.

    gqa     32 query heads sharing 8 key heads on both sides, B=1, D=128, N in {4096, 8192}, causal and not.
            ours = streamkl.attention_kl on the GQA tensors; eager = attention_kl_reference(dtype=None), which
            expands the keys with repeat_interleave and takes the softmaxes in fp32; compile = torch.compile(eager).
    varlen  packed sequences of mixed lengths (VARLEN_LENGTHS: 128 to 8192, 16384 tokens), H=16, D=128, causal.
            ours = streamkl.attention_kl_varlen; eager_loop = attention_kl_varlen_reference(dtype=None), a Python
            loop materializing each sequence's [H, n, n] maps.
    dsa     DeepSeek-DSA-style aggregated teacher: 64 teacher heads (D=128) -> 1 student head (D=64), causal,
            N in {1024, 4096}; the target is the mean of the 64 teacher attention maps (teacher_head_reduce="mean").
            eager = attention_kl_reference(dtype=None, teacher_head_reduce="mean"); compile = its torch.compile.

Every cell times the forward and the forward+backward (gradients w.r.t. the student's q, k; the teacher is
detached) and records the peak extra memory and each baseline's max |KL - ours| on the same inputs. An ``ours``
cell whose op refuses the device with NotImplementedError (none does today; the aggregated teacher was CPU-only
until session 6) reads "n/a (CPU only)" and the run goes on. ``--device cpu`` runs smaller shapes;
``--quick`` smaller still, and on the CPU without torch.compile, so ``--device cpu --scenario all --quick`` takes
well under a minute.
"""

import dataclasses
import functools
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import attention as sweep  # bench/attention.py: the sweep whose helpers this module shares
import streamkl
from streamkl import benchmark as bm

# Mixed lengths from 128 to 8192 tokens, 16384 in all; most are not multiples of a tile, so tile tails are
# exercised, and the longest sequence sits in the middle of the pack rather than at an edge.
VARLEN_LENGTHS = (1200, 128, 8192, 300, 3000, 164, 900, 1800, 200, 500)

# Shapes per (device type, --quick). The CPU keeps the head ratios (4 query heads per key head, 64 teacher heads
# per student head) at sizes a 2-core machine measures in seconds; varlen lengths are divided by `shrink`.
PRESETS = {
    ("cuda", False): dict(gqa=dict(heads=32, kv_heads=8, dim=128, seqlens=(4096, 8192)),
                          varlen=dict(heads=16, dim=128, shrink=1),
                          dsa=dict(teacher_heads=64, dim_t=128, dim_s=64, seqlens=(1024, 4096))),
    ("cuda", True): dict(gqa=dict(heads=32, kv_heads=8, dim=128, seqlens=(4096,)),
                         varlen=dict(heads=16, dim=128, shrink=1),
                         dsa=dict(teacher_heads=64, dim_t=128, dim_s=64, seqlens=(1024,))),
    ("cpu", False): dict(gqa=dict(heads=32, kv_heads=8, dim=64, seqlens=(512, 1024)),
                         varlen=dict(heads=4, dim=64, shrink=8),
                         dsa=dict(teacher_heads=64, dim_t=64, dim_s=32, seqlens=(256, 512))),
    ("cpu", True): dict(gqa=dict(heads=8, kv_heads=2, dim=64, seqlens=(256,)),
                        varlen=dict(heads=2, dim=64, shrink=16),
                        dsa=dict(teacher_heads=64, dim_t=64, dim_s=32, seqlens=(128,))),
}
ORDER = ("gqa", "varlen", "dsa")


@dataclasses.dataclass
class ScenarioRecord(sweep.Record):
    """A sweep record tagged with its scenario. ``seqlen`` is the query rows per head (varlen: all packed
    tokens), ``head_dim`` the teacher's, ``heads`` the student's query heads (rows = heads * seqlen)."""
    scenario: str = ""
    heads: int = 0


@dataclasses.dataclass
class Case:
    """One problem of a scenario: what to build, what to compare on it, and how much memory each method needs."""
    scenario: str
    head_dim: int
    seqlen: int
    causal: bool
    heads: int
    shapes: List[Tuple[int, ...]]             # q_s, k_s, q_t, k_t
    methods: Dict[str, Callable[[], Callable]]  # name -> factory of fn(q_s, k_s, q_t, k_t, **kwargs)
    kwargs: dict                               # passed to every method
    estimate: Callable[[str, str], int]        # (method, pass) -> estimated peak extra bytes


# ----------------------------------------------------------------------------------------------- estimates

def varlen_estimated_bytes(method: str, pass_name: str, lengths, heads: int, elem: int, causal: bool) -> int:
    """The loop keeps every sequence's maps for the backward (and the forward runs with the student requiring
    grad), so its peak is the sum over sequences of the sweep's per-sequence estimate."""
    if method != "eager_loop":
        return 0
    return sum(sweep.estimated_bytes("eager", pass_name, 1, heads, n, elem, causal, chunk=n) for n in lengths)


def dsa_estimated_bytes(method: str, pass_name: str, teacher_heads: int, n: int, elem: int, causal: bool) -> int:
    """The teacher's H_t maps dominate: eager holds each score map in the input dtype (plus its masked copy),
    widened to fp32, its log-softmax and the exponentials of the head log-sum-exp (~12 bytes of fp32 per entry);
    compile about one fp32 map. The detached teacher keeps nothing for the backward. The 1-head student adds
    the sweep's estimate."""
    per_entry = {"eager": 12 + elem * (2 if causal else 1), "compile": 4}.get(method, 0)
    student = sweep.estimated_bytes(method, pass_name, 1, 1, n, elem, causal, chunk=n)
    return student + teacher_heads * n * n * per_entry


# ----------------------------------------------------------------------------------------------- cases

def _padded_methods(use_compile: bool) -> Dict[str, Callable[[], Callable]]:
    """ours, eager and (optionally) a fresh torch.compile per case, all on [B, H, N, D] tensors."""
    methods = {"ours": lambda: streamkl.attention_kl, "eager": lambda: sweep.eager_attention_kl}
    if use_compile:
        methods["compile"] = sweep.compiled_attention_kl
    return methods


def gqa_case(p: dict, n: int, causal: bool, args, elem: int, use_compile: bool) -> Case:
    q_shape, k_shape = (1, p["heads"], n, p["dim"]), (1, p["kv_heads"], n, p["dim"])
    return Case("gqa", p["dim"], n, causal, p["heads"], [q_shape, k_shape, q_shape, k_shape],
                _padded_methods(use_compile), dict(causal=causal, divergence=args.divergence),
                functools.partial(sweep.estimated_bytes, batch=1, heads=p["heads"], n=n, elem=elem, causal=causal,
                                  chunk=n))


def varlen_lengths(shrink: int) -> List[int]:
    """VARLEN_LENGTHS divided by ``shrink`` (at least 8 tokens each)."""
    return [max(8, round(n / shrink)) for n in VARLEN_LENGTHS]


def varlen_case(p: dict, args, elem: int, device) -> Case:
    lengths = varlen_lengths(p["shrink"])
    total, longest = sum(lengths), max(lengths)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    ours = functools.partial(streamkl.attention_kl_varlen, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                             max_seqlen_q=longest, max_seqlen_k=longest)
    loop = functools.partial(streamkl.attention_kl_varlen_reference, cu_seqlens_q=cu_seqlens,
                             cu_seqlens_k=cu_seqlens, dtype=None)
    shape = (total, p["heads"], p["dim"])
    return Case("varlen", p["dim"], total, True, p["heads"], [shape] * 4,
                {"ours": lambda: ours, "eager_loop": lambda: loop}, dict(causal=True, divergence=args.divergence),
                functools.partial(varlen_estimated_bytes, lengths=lengths, heads=p["heads"], elem=elem, causal=True))


def dsa_case(p: dict, n: int, args, elem: int, use_compile: bool) -> Case:
    student, teacher = (1, 1, n, p["dim_s"]), (1, p["teacher_heads"], n, p["dim_t"])
    return Case("dsa", p["dim_t"], n, True, 1, [student, student, teacher, teacher], _padded_methods(use_compile),
                dict(causal=True, divergence=args.divergence, teacher_head_reduce="mean"),
                functools.partial(dsa_estimated_bytes, teacher_heads=p["teacher_heads"], n=n, elem=elem,
                                  causal=True))


def build_cases(args, device, preset: dict, use_compile: bool) -> List[Case]:
    """Every case of the scenarios asked for, in ORDER. Cheap: inputs are made when a case runs."""
    wanted = ORDER if args.scenario == "all" else (args.scenario,)
    elem = bm.resolve_dtype(args.dtype).itemsize
    cases = []
    if "gqa" in wanted:
        cases += [gqa_case(preset["gqa"], n, causal, args, elem, use_compile)
                  for causal in sweep.MASK_MODES[args.mask] for n in preset["gqa"]["seqlens"]]
    if "varlen" in wanted:
        cases.append(varlen_case(preset["varlen"], args, elem, device))
    if "dsa" in wanted:
        cases += [dsa_case(preset["dsa"], n, args, elem, use_compile) for n in preset["dsa"]["seqlens"]]
    return cases


def scenario_title(scenario: str, preset: dict) -> str:
    p = preset[scenario]
    if scenario == "gqa":
        return f"GQA: {p['heads']} query heads / {p['kv_heads']} key heads on both sides, B=1, D={p['dim']}"
    if scenario == "varlen":
        lengths = varlen_lengths(p["shrink"])
        return (f"varlen: {len(lengths)} packed sequences {lengths} ({sum(lengths)} tokens; N = all tokens), "
                f"H={p['heads']}, D={p['dim']}, causal; eager_loop materializes one sequence at a time")
    return (f"DSA-style: teacher {p['teacher_heads']} heads (D={p['dim_t']}, the D column) -> student 1 head "
            f"(D={p['dim_s']}), target = mean of the teacher maps, causal")


# ----------------------------------------------------------------------------------------------- running

def refusal(fn: Callable, inputs, kwargs: dict) -> Optional[str]:
    """``"n/a (...)"`` when ``fn`` refuses these inputs with NotImplementedError (a feature without a kernel on
    this device yet), else ``None``. Other errors are left for the measured call to record."""
    try:
        with torch.no_grad():
            fn(*inputs, **kwargs)
    except NotImplementedError as exc:
        return "n/a (CPU only)" if "CPU only" in str(exc) else f"n/a ({str(exc).splitlines()[0][:100]})"
    except Exception:  # noqa: BLE001
        return None
    return None


def run_case(case: Case, args, device, mem_limit: float, progress: bm.Progress) -> List[ScenarioRecord]:
    """Measure every method and pass of ``case``; baselines' forward outputs are compared with ours."""
    dtype = bm.resolve_dtype(args.dtype)
    sets = bm.make_input_sets(case.shapes, dtype, device, seed=args.seed, n_sets=args.rotate)
    records, ours_out = [], None
    for method, factory in case.methods.items():
        fn = factory()
        blocked = None
        if method == "ours":
            blocked = sweep.ours_unavailable_reason(device) or refusal(fn, sets[0], case.kwargs)
        for pass_name in sweep.PASSES:
            mask = "causal" if case.causal else "full"
            progress.step(f"{case.scenario} N={case.seqlen} {mask} {method} {pass_name}")
            record = ScenarioRecord(method, case.head_dim, case.seqlen, case.causal, pass_name,
                                    scenario=case.scenario, heads=case.heads)
            records.append(record)
            out = measure_method(record, fn, sets, case, blocked, args, device, mem_limit)
            if pass_name == "fwd" and out is not None:
                ours_out = sweep.note_forward_output(record, out, ours_out)
    del sets, ours_out
    bm.free_memory(device)
    return records


def measure_method(record: ScenarioRecord, fn: Callable, sets, case: Case, blocked: Optional[str], args, device,
                   mem_limit: float) -> Optional[torch.Tensor]:
    """One cell through the sweep's runner (OOM and errors become the status); returns the forward output."""
    if blocked:
        record.status = blocked
        return None
    record.estimated_bytes = case.estimate(record.method, record.pass_name)
    if record.estimated_bytes > mem_limit:
        record.status = f"skipped (est. {record.estimated_bytes / sweep.GB:.0f} GB)"
        return None

    def factory():
        rotation = bm.Rotation(sets)
        if record.pass_name == "fwd":
            return bm.forward_step(fn, rotation, **case.kwargs)
        return bm.forward_backward_step(fn, rotation, n_grad=2, **case.kwargs)

    return sweep.run_cell(record, factory, device, args.repeats)


# ----------------------------------------------------------------------------------------------- reporting

def print_report(args, env: dict, preset: dict, records: List[ScenarioRecord], use_compile: bool,
                 elapsed: float) -> None:
    """Per scenario: its shapes, the time and memory tables of the sweep, agreement with ours, odd statuses."""
    print(f"attention-KL scenarios on {env['device_name']} | torch {env['torch']} | streamkl {env['streamkl']} "
          f"(CUDA kernels: {'yes' if env['streamkl_cuda_kernels'] else 'no'}) | {elapsed:.0f} s")
    print(f"{args.dtype}, {args.divergence} KL, grads w.r.t. student q,k (teacher detached); torch.compile "
          f"{'on' if use_compile else 'off'}; timing: {env['timing']}, median; memory: {env['memory']}")
    if env.get("cpu_load_note"):
        print(env["cpu_load_note"])
    for scenario in ORDER:
        mine = [r for r in records if r.scenario == scenario]
        if not mine:
            continue
        print(f"\n== {scenario_title(scenario, preset)}")
        print("median time, ms (fwd / fwd+bwd)")
        print(sweep.time_table(mine))
        print("peak extra memory, GB (M = MiB) (fwd / fwd+bwd)")
        print(sweep.memory_table(mine, 1, mine[0].heads))
        agreement = sweep.agreement_line(mine)
        print(agreement or "max |KL - ours|: not compared (ours or every baseline did not run)")
        for r in mine:
            if not r.ok:
                print(f"  {r.method} N={r.seqlen} {'causal' if r.causal else 'full'} {r.pass_name}: {r.status}")


def main(args) -> int:
    """Entry point from bench/attention.py once ``--scenario`` is not ``sweep``."""
    device = sweep.resolve_device(args)
    args.dtype = sweep.default_dtype_name(args.dtype, device)
    preset = PRESETS[(device.type, bool(args.quick))]
    # Inductor's CPU compile alone takes longer than the CPU smoke test is allowed to.
    use_compile = not args.no_compile and not (device.type == "cpu" and args.quick)
    args.scenario_shapes = preset  # recorded in the JSON config, with the two lines below
    args.compile = use_compile
    args.varlen_lengths = varlen_lengths(preset["varlen"]["shrink"])
    if device.type == "cuda" and not streamkl.cuda_available():
        print("WARNING: streamkl has no CUDA kernels compiled in; 'ours' is reported as n/a, baselines still run.",
              file=sys.stderr)
    env = bm.environment_info(device)
    mem_limit = sweep.memory_limit_bytes(args.mem_limit_gb, device)
    args.mem_limit_gb = mem_limit / sweep.GB
    cases = build_cases(args, device, preset, use_compile)
    progress = bm.Progress(sum(len(c.methods) for c in cases) * len(sweep.PASSES), enabled=not args.quiet)
    start = time.perf_counter()
    records = [r for case in cases for r in run_case(case, args, device, mem_limit, progress)]
    progress.close()
    elapsed = time.perf_counter() - start
    if args.out:
        # One file per --scenario value, so runs split by scenario can share an --out folder.
        sweep.write_outputs(args, device, env, records, args.out, stem=f"attention_scenarios_{args.scenario}",
                            plot=False)
    print_report(args, env, preset, records, use_compile, elapsed)
    return 0
