"""The SparseAdamW step over a 7B model's deltas: fused op (``spiel.ops.adamw_step_``) against the grouped
foreach chain it replaces and torch's own fused AdamW.

    python benchmarks/bench_optim.py                   # H100: ~30 s
    python benchmarks/bench_optim.py --device cpu --small

Case: the LLaMA-2-7B layout: 224 value tensors (32 x q,k,v,o with 524,288 deltas and gate,up,down with 966,656:
LoRA-r64-matched, 159.9M deltas), fp32 values, fp32 (or bf16) moments, int16 per-slot counts. Providers:
  copy                 torch copy of the bytes the step must move (read + write), the ceiling
  foreach              SparseAdamW's unfused path (``adamw_foreach``: ~20 foreach launches per 2**24 deltas)
  fused-triton/-cuda   ``spiel.ops.adamw_step_`` on one backend (the public op: per-tensor argument checks)
  fused-*-unchecked    the same kernels through ``adamw_step_eager``, what SparseAdamW calls
  torch-fused-adamw    ``torch._fused_adamw_`` on the same tensors with ONE count per tensor (what torch offers;
                       cannot restart a regrown slot's bias correction), for scale
Columns: GPU median ms, effective TB/s (bytes the step must move / time), and host ms: the CPU time to enqueue
one step (no sync), which is what a launch-bound training step pays.
Floor: per delta read value, grad, 2 moments, count and write value, 2 moments, count: 32 B with fp32 moments
and int16 counts (24 B with bf16 moments): 5.1 GB at 7B, 1.7 ms at 3.0 TB/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import Runner, common_args, fmt, guarded_main, pick_device, print_header, print_table  # noqa: E402

LLAMA7B = [524_288] * 4 + [966_656] * 3  # per decoder layer: q, k, v, o, gate, up, down at LoRA-r64 density


def host_ms(fn, reps: int = 20) -> float:
    """Median CPU time to enqueue one call (device drained between calls, not inside)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--small", action="store_true", help="2 layers of 1/1000 the size (CPU smoke test)")
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    import spiel.ops as ops
    from spiel.ops._dispatch import kernel_for
    from spiel.ops.adamw import adamw_step_eager
    from spiel.optim.adamw import adamw_foreach

    layers = 2 if args.small else args.layers
    sizes = [max(1, n // 1000) if args.small else n for n in LLAMA7B] * layers
    total = sum(sizes)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)

    def make(state_dtype):
        g = torch.Generator(device=device).manual_seed(0)
        params = [torch.randn(n, device=device, generator=g) * 1e-3 for n in sizes]
        grads = [torch.randn(n, device=device, generator=g) for n in sizes]
        ms = [(torch.randn(n, device=device, generator=g) * 1e-2).to(state_dtype) for n in sizes]
        vs = [(torch.rand(n, device=device, generator=g) * 1e-3).to(state_dtype) for n in sizes]
        steps = [torch.randint(0, 100, (n,), device=device, generator=g, dtype=torch.int16) for n in sizes]
        return params, grads, ms, vs, steps

    def body(runner: Runner) -> None:
        print_header("optim", device, runner.ceil)
        for state_dtype in (torch.float32, torch.bfloat16):
            sb = torch.finfo(state_dtype).bits // 8
            step_bytes = total * (2 * 4 + 2 * 2 * sb + 2 * 2 + 4)  # value r+w, moments r+w, count r+w, grad r
            case = f"7B x{layers} layers, {total / 1e6:.1f}M deltas, moments {str(state_dtype)[6:]}"
            info = {"deltas": total, "state": str(state_dtype)[6:], "bytes": step_bytes}
            lists = make(state_dtype)

            def with_bw(row):
                if row.get("ms"):
                    row["tbps"] = step_bytes / (float(row["ms"]) * 1e-3) / 1e12
                return row

            def copy_factory():
                src = torch.empty(step_bytes // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                return lambda: dst.copy_(src)

            ref = with_bw(runner.run(case, "copy", copy_factory, info, reference=True))
            ref_ms = ref.get("ms")

            def provider(name, fn):
                def factory():
                    host = host_ms(fn)
                    return fn, f"host {host:.3f} ms"
                with_bw(runner.run(case, name, factory, info, ref_ms=ref_ms))

            provider("foreach", lambda: adamw_foreach(*lists, **hyper))
            for backend in ("triton", "cuda"):
                kernel = kernel_for("adamw_step", backend)
                available = ops.backend_info()[backend]["available"] and kernel is not None
                if not available or (device.type != "cuda" and backend == "cuda"):
                    runner.record({"case": case, "provider": f"fused-{backend}",
                                   "note": f"skipped: backend {backend} unavailable here"})
                    continue

                def fused(backend=backend):
                    with ops.use_backend(backend):
                        ops.adamw_step_(*lists, **hyper)
                provider(f"fused-{backend}", fused)

                def fused_eager(backend=backend):  # what SparseAdamW calls: no per-tensor argument checks
                    with ops.use_backend(backend):
                        adamw_step_eager(*lists, **hyper)
                provider(f"fused-{backend}-unchecked", fused_eager)
            if state_dtype == torch.float32 and device.type == "cuda" and hasattr(torch, "_fused_adamw_"):
                counts = [torch.tensor(10.0, device=device) for _ in sizes]

                def torch_fused():
                    torch._fused_adamw_(lists[0], lists[1], lists[2], lists[3], [], counts, lr=hyper["lr"],
                                        beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False,
                                        maximize=False)
                provider("torch-fused-adamw", torch_fused)
            del lists

    def summary(runner: Runner) -> None:
        for row in runner.rows:
            if row.get("ms") and row.get("bytes") and not row.get("tbps"):
                row["tbps"] = float(row["bytes"]) / (float(row["ms"]) * 1e-3) / 1e12
        print_table(runner.rows, [("case", "case"), ("provider", "provider"), ("ms", "ms"),
                                  ("p20-p80", lambda r: f"{fmt(r.get('ms_p20'))}-{fmt(r.get('ms_p80'))}"),
                                  ("x copy", "x_ref"), ("TB/s", "tbps"), ("peak MiB", "peak_mib"), ("note", "note")],
                    title="SparseAdamW step, 7B layout: GPU median ms (x copy = time / a copy of the step's "
                          "bytes), host = CPU ms to enqueue one step")

    if device.type != "cuda" and not args.small:
        raise SystemExit("the 7B layout needs a GPU: use --small on the CPU")
    return guarded_main(lambda: Runner("optim", device, args.csv, rep_ms=100), body, summary)


if __name__ == "__main__":
    sys.exit(main())
