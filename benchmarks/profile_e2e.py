"""Profile one provider's training steps on the LLaMA shape of bench_e2e: where the time and memory go.

    python benchmarks/profile_e2e.py --provider spiel-ag --model 7b       # H100: ~1 min
    python benchmarks/profile_e2e.py --provider spiel-ag --model tiny --device cpu

Prints: step time (CUDA events) and the GPU-busy fraction (sum of kernel times / wall: below ~0.9 the step is
launch-bound), the top CUDA kernels by total time, peak memory per phase (forward, backward, optimizer,
scheduler) and the cost of each scheduler phase of a reselection cycle (probe step, accumulation steps,
update step) against a plain step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_e2e as E  # noqa: E402
import harness  # noqa: E402

GIB = 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", default="spiel-ag", choices=sorted(E.ALL_PROVIDERS))
    p.add_argument("--model", default="7b", choices=sorted(E.SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--reselection-steps", type=int, default=20)
    p.add_argument("--accumulation-steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--prefer", action="append", default=[], metavar="KERNEL=BACKEND",
                   help="put BACKEND first in spiel's auto order for KERNEL (e.g. merge_delta=cuda)")
    p.add_argument("--no-cycle", action="store_true", help="skip the reselection cycle: 3 plain steps, then profile")
    p.add_argument("--probe-block-elements", type=int, default=None,
                   help="AG: dense-gradient elements the probe forms at once (SpielScheduler block_elements)")
    p.add_argument("--sparse-adamw-steps", choices=("slot", "tensor"), default="slot",
                   help="SparseAdamW's step counts: per slot (default) or one per layer")
    p.add_argument("--step-in-backward", action="store_true",
                   help="spiel optimizers update each layer inside backward and free its gradient")
    p.add_argument("--sddmm-row-plans", choices=("auto", "off"), default="auto",
                   help="row plans for plan-free layers (bench_e2e's A/B switch)")
    p.add_argument("--probe-gradient", choices=("sddmm", "reuse"), default="sddmm",
                   help="AG probe step: the values' gradient from the probe's blocks or the layer's sddmm")
    p.add_argument("--host", action="store_true",
                   help="also measure the host side of plain steps: device syncs (torch.cuda sync debug mode), the "
                        "CPU time to enqueue each phase and a cProfile of the Python; with --profile-update, the "
                        "same for the index-update steps (the AG probe step, the reselection step)")
    p.add_argument("--profile-update", action="store_true",
                   help="also profile the index-update steps (the AG probe step through the reselection step, or "
                        "the MA reselection step): kernels and the scheduler's labelled phases")
    args = p.parse_args(argv)
    for item in args.prefer:
        from spiel.ops import AUTO_ORDER

        kernel, _, backend = item.partition("=")
        AUTO_ORDER[kernel] = (backend,) + tuple(b for b in AUTO_ORDER.get(kernel, ("cuda", "triton", "torch"))
                                                 if b != backend)
    args.seq = None
    E.quiet()
    device = harness.pick_device(args.device)
    cuda = device.type == "cuda"
    shape = dict(E.SHAPES[args.model])
    model = E.build_model(shape, device, nf4=args.provider in E.NF4_PROVIDERS)
    S = args.reselection_steps
    model, opt, sched, layers = E.setup_provider(args.provider, model, shape, args, device, 10 * S, [])
    if args.probe_block_elements is not None and sched is not None:
        sched.block_elements = args.probe_block_elements
    model.train()
    ids = torch.randint(shape["vocab"], (1, shape["seq"]), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    phases = {}

    def peak_reset():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def peak():
        return torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")

    def step(record=False, marks=None):
        """One training step. ``record``: the peak memory of each phase into ``phases``; ``marks``: the host
        time to enqueue each phase (no sync inside) into ``marks``. The scheduler phase includes zero_grad."""
        t = [time.perf_counter()]
        peak_reset()

        def done(name):
            if record:
                phases.setdefault(name, []).append(peak())
                peak_reset()
            if marks is not None:
                now = time.perf_counter()
                marks.setdefault(name, []).append((now - t[0]) * 1e3)
                t[0] = now

        out = model(input_ids=ids, labels=ids)
        done("forward")
        out.loss.backward()
        done("backward")
        if opt is not None:
            opt.step()
        done("optimizer")
        if sched is not None:
            sched.step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        done("scheduler")

    # a full reselection cycle, each step timed and labelled
    kinds = []
    step_peaks = {}  # step kind -> peak GiB of each such step (max over its phases)
    for i in range(3 if args.no_cycle else 2 * S + 1):
        before = E.layer_signature(layers) if layers else None
        sync()
        t = time.perf_counter()
        step(record=True)
        sync()
        dt = (time.perf_counter() - t) * 1e3
        if i >= (1 if args.no_cycle else S):  # the second cycle (the first warms up)
            probe = bool(before) and any(b[3] for b in before)
            cand = bool(before) and any(b[2] for b in before)
            changed = bool(layers) and E.update_step(before, E.layer_signature(layers)) and not (probe or cand)
            kind = "probe" if probe else ("update" if changed and not cand else ("accumulate" if cand else "plain"))
            if cand and any(b[0] is not a[0] or b[1] != a[1] for b, a in zip(before, E.layer_signature(layers))):
                kind = "accumulate+update"
            kinds.append((kind, dt))
            step_peaks.setdefault(kind, []).append(max(v[-1] for v in phases.values()))
    by = {}
    for kind, dt in kinds:
        by.setdefault(kind, []).append(dt)
    plain = statistics.median(by.get("plain", [float("nan")]))
    print(f"\n== {args.provider} on {args.model} {args.prefer or ''}: ms per step by kind "
          f"({'plain steps' if args.no_cycle else f'second reselection cycle, S={S}'})")
    for kind, v in sorted(by.items()):
        print(f"  {kind:18s} n={len(v):2d}  median {statistics.median(v):8.1f} ms  extra over plain "
              f"{statistics.median(v) - plain:8.1f} ms")
    avg = statistics.fmean(dt for _, dt in kinds)
    print(f"  average over the cycle {avg:.1f} ms = plain x {avg / plain:.3f}")
    print("\n== peak memory per phase (GiB, max over the cycle)")
    for ph, v in phases.items():
        print(f"  {ph:10s} {max(v):7.2f}")
    print("== peak memory per step kind (GiB, max over the profiled cycle's steps of that kind)")
    for kind, v in sorted(step_peaks.items()):
        print(f"  {kind:18s} {max(v):7.2f}")
    if args.profile_update and sched is not None:
        profile_update_steps(step, sync, sched, layers, S, args.top, cuda)
        if args.host:
            profile_update_host(step, sync, sched, layers, S, args.top, cuda)
    if not cuda:
        if args.host:
            profile_host(step, sync, args.top, cuda)
        return 0
    from torch.profiler import ProfilerActivity, profile

    # profile two plain steps

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        sync()
    # kernels only: an op's own row also carries its kernels' time as self device time (counting both doubled
    # the busy time printed by session 3's runs)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_dev = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    sync()
    t = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    wall = (time.perf_counter() - t) * 1e6
    print(f"\n== two plain steps: wall {wall / 2e3:.1f} ms/step, device busy {total_dev / 2e3:.1f} ms/step "
          f"({total_dev / wall:.0%} of wall; profiled separately)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if not hasattr(events[0], "self_device_time_total")
                                    else "self_device_time_total", row_limit=args.top, max_name_column_width=60))
    if args.host:
        profile_host(step, sync, args.top, cuda)
    return 0


def _syncs_in(step, sync) -> list:
    """The synchronizing calls of one ``step()`` (the sync debug mode warns at each), first lines."""
    import warnings

    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # (the mode's own "is a prototype feature" notice is not a sync)
    return [str(w.message).splitlines()[0][:120] for w in caught if "called a synchronizing" in str(w.message)]


def _print_syncs(title: str, syncs: list) -> None:
    print(f"\n== {title}: {len(syncs)}")
    for line in sorted(set(syncs))[:10]:
        print(f"   {line}")


def _enqueue_and_wall(step, sync, marks: dict) -> tuple:
    """One ``step(marks=marks)`` on a drained device: (ms until it returns, ms until the device drains)."""
    sync()
    t0 = time.perf_counter()
    step(marks=marks)
    t_end = time.perf_counter()
    sync()
    return (t_end - t0) * 1e3, (time.perf_counter() - t0) * 1e3


def _print_cprofile(title: str, step, sync, steps: int, top: int) -> None:
    """cProfile of ``steps`` steps (device drained before and after), by own time."""
    import cProfile
    import io
    import pstats

    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"== {title} (by own time)")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip()))


def profile_host(step, sync, top: int, cuda: bool) -> None:
    """The host side of plain steps: is the step launch-bound, and where does the CPU time go?"""
    if cuda:  # 1. device syncs
        _print_syncs("host: device syncs in one plain step", _syncs_in(step, sync))
    # 2. CPU time to enqueue each phase, the device drained first (phases run ahead of the GPU unless the launch
    #    queue fills): the enqueue total against the wall time says whether the step is launch-bound
    marks = {}
    for _ in range(3):
        enqueue, wall = _enqueue_and_wall(step, sync, marks)
        marks.setdefault("enqueue total", []).append(enqueue)
        marks.setdefault("wall (drained)", []).append(wall)
    print("== host: ms per plain step (median of 3)")
    for name, v in marks.items():
        print(f"   {name:16s} {statistics.median(v):8.1f}")
    _print_cprofile("host: cProfile of two plain steps", step, sync, 2, top)  # 3. Python


def _advance_to(kind, step, sched, layers, S) -> bool:
    """Run plain steps until the next step is ``kind`` ("probe": a layer has its gradient probe armed;
    "update": the scheduler's next step changes the indices). False if none came within two cycles."""
    for _ in range(2 * S + 1):
        armed = any(b[3] for b in E.layer_signature(layers))
        update_next = not armed and sched.is_update_step(sched.step_count + 1)
        if (kind == "probe" and armed) or (kind == "update" and update_next):
            return True
        step()
    return False


def profile_update_host(step, sync, sched, layers, S, top, cuda) -> None:
    """The host side of the index-update steps (the AG probe step and the reselection step; MA: the reselection
    step): device syncs, enqueue time against the drained wall time, and a cProfile by own time. Each
    measurement takes its own cycle (a probe step happens once per cycle)."""
    kinds = ("probe", "update") if sched.mode == "ag" else ("update",)
    for kind in kinds:
        if cuda and _advance_to(kind, step, sched, layers, S):
            _print_syncs(f"host, {kind} step: device syncs", _syncs_in(step, sync))
        if not _advance_to(kind, step, sched, layers, S):
            print(f"== host, {kind} step: none within two cycles")
            continue
        marks = {}
        enqueue, wall = _enqueue_and_wall(step, sync, marks)
        print(f"== host, {kind} step: enqueue {enqueue:.1f} ms, wall (drained) {wall:.1f} ms; phases "
              + ", ".join(f"{name} {v[0]:.1f}" for name, v in marks.items()))
        if _advance_to(kind, step, sched, layers, S):  # a later cycle's step of the same kind
            _print_cprofile(f"host, {kind} step: cProfile", step, sync, 1, top)
        else:
            print(f"== host, {kind} step: no second one within two cycles (no cProfile)")


def profile_update_steps(step, sync, sched, layers, S, top, cuda) -> None:
    """Profile from the step that runs the AG probe (or, for MA, the step before the update) through the step
    that changes the indices: the top kernels and the scheduler's phases (record_function ranges)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2 * S):  # advance to just before the next probe / update
        sig = E.layer_signature(layers)
        nxt = sched.step_count + 1
        if any(b[3] for b in sig) or sched.is_update_step(nxt):
            break
        step()
    sync()
    n = 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2 * S):
            before = E.layer_signature(layers)
            step()
            n += 1
            if any(b[0] is not a[0] or b[1] != a[1] for b, a in zip(before, E.layer_signature(layers))):
                break  # the indices changed: the reselection step ran
        sync()
    rows = prof.key_averages()
    print(f"\n== index-update steps profiled: {n} steps from the probe to the reselection")
    print("   scheduler phases: 'host' rows = the range on the CPU (CPU total = wall of the phase incl. launches;\n"
          "   device = kernels launched inside it); 'gpu' rows = the same range's span on the GPU timeline")
    for e in rows:
        if e.key.startswith("spiel.scheduler."):
            dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if e.device_type == torch.autograd.DeviceType.CPU:
                print(f"  {e.key:28s} host calls {e.count:4d}  CPU total {e.cpu_time_total / 1e3:8.1f} ms  "
                      f"device {dev / 1e3:8.1f} ms")
            else:
                print(f"  {e.key:28s} gpu  calls {e.count:4d}  span on the GPU {dev / 1e3:8.1f} ms")
    if cuda:
        key = "self_device_time_total" if hasattr(rows[0], "self_device_time_total") else "self_cuda_time_total"
        print(rows.table(sort_by=key, row_limit=top, max_name_column_width=60))
    print(rows.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
