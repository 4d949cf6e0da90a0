"""Turn a pytest-benchmark JSON into the tables of benchmarks/RESULTS.md and a plot.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out TABLE.md] [--plot SPEEDUP.png]
                                [--tuning-table TUNED.json]

Several JSON files (one pytest-benchmark run each, e.g. the phases of benchmarks/gpu_check.sh) are read as one.

Per group: every contender's median time (on CUDA the device time of benchmarks/conftest.py), achieved GB/s
under the ideal byte model, its fraction of the copy bandwidth measured in the same run, and the speed ratio
against each baseline present in the group (ratio > 1: faster than that baseline). A value that the column's
places would round to 0 keeps two significant digits. The plot's speed-up axis is logarithmic.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict

BASELINES = ("eager", "loop_F.batch_norm", "plain_batch_norm", "compiled_reference", "layer_norm_then_gate",
             "libmtl_loop", "unchunked_matmul", "ordinary_backward", "per_task_loop", "eager_sync", "unsynced")


def load(*paths: str | pathlib.Path) -> dict:
    """One pytest-benchmark JSON, or several merged: the first file's machine and commit, every benchmark."""
    runs = []
    for path in paths:
        try:
            run = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as exc:      # ValueError: not JSON, or not UTF-8
            raise SystemExit(f"benchmarks.report: cannot read {path}: {exc}") from None
        if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
            raise SystemExit(f"benchmarks.report: {path} is not a pytest-benchmark JSON (--benchmark-json): it has "
                             "no 'benchmarks' list")
        runs.append(run)
    merged = dict(runs[0])
    merged["benchmarks"] = [b for run in runs for b in run.get("benchmarks", [])]
    return merged


def _group(bench: dict) -> str:
    # pytest-benchmark writes "group": null for a benchmark that sets none (any suite but ours); sorting the
    # groups then failed on None < str.
    return bench.get("group") or "(no group)"


def rows_by_group(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        groups[_group(bench)].append({
            "contender": info.get("contender", bench["name"]),
            # On CUDA the device time (events / CUDA graph replays, benchmarks/conftest.py); else host time.
            "median": info.get("device_median_s", bench["stats"]["median"]),
            "timing": info.get("timing", "host"),
            "gbps": info.get("gbps"),
            "copy_fraction": info.get("copy_fraction"),
        })
    return dict(groups)


def speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """contender -> {baseline: baseline_time / contender_time} for the baselines present in the group."""
    by_name = {r["contender"]: r["median"] for r in rows}
    present = [b for b in BASELINES if b in by_name]
    return {r["contender"]: {b: by_name[b] / r["median"] for b in present if b != r["contender"]} for r in rows}


FUSED = ("cuda", "triton", "cpu")


def tuning_entries(data: dict) -> list[dict]:
    """The fastest fused backend per norm-layer group with more than one of them, as "backend" entries of a
    tsbn_kernels.tuning table: forward+backward groups give the training entries (forward groups only where no
    forward+backward group was measured), eval groups the eval entries."""
    best: dict[tuple, tuple[int, dict]] = {}
    by_group: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        by_group[_group(bench)].append(bench)
    for group, benches in by_group.items():
        parts = group.split("/")
        if parts[0] not in ("ts_batch_norm", "ts_layer_norm"):
            continue
        op, pass_, dtype = parts[0], parts[1], parts[3]
        layout = parts[4] if len(parts) > 4 else "nchw"
        times = {b["extra_info"]["contender"]: b["extra_info"].get("device_median_s", b["stats"]["median"])
                 for b in benches if b["extra_info"].get("contender") in FUSED}
        shape = next((b["extra_info"].get("shape") for b in benches if b["extra_info"].get("shape")), None)
        if len(times) < 2 or not shape:
            continue
        numel = 1
        for d in shape:
            numel *= d
        key = (op, pass_ != "eval", dtype, layout, numel)
        rank = {"forward_backward": 0, "eval": 0, "forward": 1}[pass_]
        entry = {"op": op, "training": pass_ != "eval", "dtype": dtype, "layout": layout, "numel": numel,
                 "channels": shape[1] if op == "ts_batch_norm" else shape[-1], "best": min(times, key=times.get),
                 "times": times, "measured_on": group}
        if key not in best or rank < best[key][0]:
            best[key] = (rank, entry)
    return [entry for _, entry in sorted(best.values(), key=lambda r: r[1]["measured_on"])]


def write_tuning_table(data: dict, path: str | pathlib.Path) -> int:
    """Put the backend winners into the tuning table at ``path``, keeping its other keys (the Triton sweep)."""
    path = pathlib.Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = tuning_entries(data)
    device = next((b["extra_info"].get("device_name") for b in data["benchmarks"] if b.get("extra_info")), "?")
    table.update(device_name=device, backend=entries, backend_commit=data.get("commit_info", {}).get("id", "?"))
    path.write_text(json.dumps(table, indent=1))
    return len(entries)


def _fmt(value: float | None, decimals: int, suffix: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:.{decimals}f}"
    if value and float(text) == 0:
        # Rounded to the column's places, 0.04 GB/s read "0.0" beside its "11%" of the copy bandwidth, and every
        # contender over 200x slower than a baseline "0.00x": two significant digits instead.
        text = f"{value:.2g}"
    return text + suffix


def markdown(data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    isa = (f"; C++ CPU kernels: {machine['tsbn_cpu_isa']} build (torch CPU capability "
           f"{machine.get('torch_cpu_capability', '?')})" if "tsbn_cpu_isa" in machine else "")
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}{isa}; "
             f"commit {commit.get('id', '?')[:10]}; {data.get('datetime', '?')}", ""]
    groups = rows_by_group(data)
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda r: r["median"])
        ratios = speedups(rows)
        baselines = [b for b in BASELINES if any(b in ratios[r["contender"]] for r in rows)]
        copy_gbps = next((b.get("extra_info", {}).get("copy_gbps") for b in data["benchmarks"]
                          if _group(b) == group), None)
        lines.append(f"### {group}" + (f" (copy bandwidth {copy_gbps:.1f} GB/s)" if copy_gbps else ""))
        lines.append("")
        timed = any(r["timing"] != "host" for r in rows)    # CUDA: say which rows are graph replays
        header = ["contender", "median ms", "GB/s", "% copy BW"] + [f"vs {b}" for b in baselines] \
            + (["timing"] if timed else [])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            cells = [r["contender"], f"{r['median'] * 1e3:.3f}", _fmt(r["gbps"], 1),
                     _fmt(None if r["copy_fraction"] is None else 100 * r["copy_fraction"], 0, "%")]
            cells += [_fmt(ratios[r["contender"]].get(b), 2, "x") for b in baselines]
            cells += [r["timing"]] if timed else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: str | pathlib.Path) -> None:
    """Speed-up of every contender against the eager reference, one bar group per benchmark group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = rows_by_group(data)
    labels, values, names = [], [], []
    for group in sorted(groups):
        ratios = speedups(groups[group])
        for contender, against in sorted(ratios.items()):
            if "eager" in against:
                labels.append(f"{group} · {contender}")
                values.append(against["eager"])
                names.append(contender)
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.22 * len(labels) + 1)))
    # Ratios span orders of magnitude (0.01x to 100x): on a linear axis every contender slower than eager was a
    # sliver at 0, 0.5x and 0.01x alike. On a log axis the bars grow from 1x, left for slower, right for faster.
    ax.set_xscale("log")
    ax.barh(range(len(labels)), [v - 1 for v in values], left=1.0,
            color=["tab:orange" if "loop" in n or "plain" in n else "tab:blue" for n in names])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("speed-up over the eager reference (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON (--benchmark-json); several are merged")
    parser.add_argument("--out", help="write the markdown here instead of stdout")
    parser.add_argument("--plot", help="write a PNG of the speed-ups over eager")
    parser.add_argument("--tuning-table", help="write the fastest fused backend per shape into this "
                        "tsbn_kernels.tuning table (backend=\"auto\" reads it)")
    args = parser.parse_args(argv)
    data = load(*args.results)
    if not data["benchmarks"]:
        # A table of nothing under the machine line, an empty plot and an empty tuning table read as success.
        raise SystemExit(f"benchmarks.report: no benchmark results in {', '.join(args.results)} (pytest-benchmark "
                         "records none when every benchmark was skipped, deselected or run with --benchmark-disable)")
    text = markdown(data)
    try:
        if args.out:
            pathlib.Path(args.out).write_text(text)
        else:
            print(text)
        if args.plot:
            plot(data, args.plot)
        if args.tuning_table:
            print(f"{write_tuning_table(data, args.tuning_table)} backend entries written to {args.tuning_table}")
    except OSError as exc:        # a missing directory, no permission: which of the outputs, not a traceback
        raise SystemExit(f"benchmarks.report: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}") \
            from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
