"""benchmarks.report on a hand-made pytest-benchmark JSON: ratios, bandwidth columns, plot."""
from __future__ import annotations

import json

from benchmarks import report


def fake_results():
    def bench(group, contender, median, gbps=None):
        return {"group": group, "name": f"test[{contender}]", "stats": {"median": median},
                "extra_info": {"contender": contender, "gbps": gbps, "copy_gbps": 20.0,
                               "copy_fraction": None if gbps is None else gbps / 20.0}}
    return {"machine_info": {"cpu": {"brand_raw": "test cpu"}}, "commit_info": {"id": "abcdef1234567"},
            "datetime": "2026-11-22", "benchmarks": [
                bench("g1", "cpu", 0.010, 10.0), bench("g1", "eager", 0.030, 3.3),
                bench("g1", "plain_batch_norm", 0.012, 8.3), bench("g1", "loop_F.batch_norm", 0.020, 5.0),
                bench("g2", "eager", 0.002)]}


def test_speedups_against_each_baseline():
    rows = report.rows_by_group(fake_results())["g1"]
    ratios = report.speedups(rows)
    assert abs(ratios["cpu"]["eager"] - 3.0) < 1e-12
    assert abs(ratios["cpu"]["plain_batch_norm"] - 1.2) < 1e-12
    assert abs(ratios["cpu"]["loop_F.batch_norm"] - 2.0) < 1e-12
    assert "eager" not in ratios["eager"]


def test_markdown_table(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_results()))
    out = tmp_path / "t.md"
    png = tmp_path / "p.png"
    assert report.main([str(path), "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    assert "### g1 (copy bandwidth 20.0 GB/s)" in text
    assert "| cpu | 10.000 | 10.0 | 50% | 3.00x | 2.00x | 1.20x |" in text
    assert "abcdef1234" in text
    assert png.stat().st_size > 1000


def test_device_time_takes_precedence_and_names_its_method():
    """CUDA results carry the event/graph-timed median in extra_info; the table uses it, not the host time."""
    data = fake_results()
    for bench, (device_s, timing) in zip(data["benchmarks"][:2], [(0.001, "cuda_graph"), (0.004, "events")]):
        bench["extra_info"].update(device_median_s=device_s, timing=timing)
    rows = {r["contender"]: r for r in report.rows_by_group(data)["g1"]}
    assert rows["cpu"]["median"] == 0.001 and rows["eager"]["median"] == 0.004
    assert rows["plain_batch_norm"]["median"] == 0.012 and rows["plain_batch_norm"]["timing"] == "host"
    assert abs(report.speedups(list(rows.values()))["cpu"]["eager"] - 4.0) < 1e-12
    text = report.markdown(data)
    assert "| cpu | 1.000 |" in text and text.count("cuda_graph") == 1 and "| timing |" in text


def test_rotation_exceeds_the_cache():
    from benchmarks.conftest import MAX_ROTATION, rotation_count
    cache = 50 << 20
    assert rotation_count(1 << 30, cache) == 1
    assert rotation_count(40 << 20, cache) == 4 and 4 * (40 << 20) >= 3 * cache
    assert rotation_count(1 << 10, cache) == MAX_ROTATION


def test_unreadable_input_is_one_line_naming_the_file(tmp_path):
    import pytest

    (tmp_path / "log.txt").write_text("148 passed in 503.22s")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, message in (("log.txt", "cannot read .*log.txt"), ("missing.json", "cannot read .*missing.json"),
                          ("list.json", "list.json is not a pytest-benchmark JSON")):
        with pytest.raises(SystemExit, match=message):
            report.main([str(tmp_path / name)])


def test_benchmarks_without_group_or_extra_info(tmp_path):
    """pytest-benchmark writes "group": null for a benchmark that sets no group, and a suite other than ours
    leaves extra_info empty or out: the table still has every row."""
    data = fake_results()
    data["benchmarks"] += [{"group": None, "name": "test_a", "stats": {"median": 0.5}, "extra_info": {}},
                           {"group": None, "name": "test_b", "stats": {"median": 0.25}}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "t.md"
    assert report.main([str(path), "--out", str(out), "--plot", str(tmp_path / "p.png"),
                        "--tuning-table", str(tmp_path / "tuned.json")]) == 0
    text = out.read_text()
    assert "### (no group)" in text and "| test_b | 250.000 |" in text and "| test_a | 500.000 |" in text
    assert "| cpu | 10.000 | 10.0 | 50% | 3.00x | 2.00x | 1.20x |" in text


def test_small_values_keep_two_significant_digits():
    """A training step moves few ideal bytes per second (0.04 GB/s, 0.2 % of the copy bandwidth) and a contender
    400x slower than a baseline has a ratio of 0.0025: rounded to the column's places they all read 0."""
    data = fake_results()
    data["benchmarks"].append({"group": "g1", "name": "test[slow]", "stats": {"median": 12.0},
                               "extra_info": {"contender": "slow", "gbps": 0.04, "copy_fraction": 0.002}})
    text = report.markdown(data)
    assert "| slow | 12000.000 | 0.04 | 0.2% | 0.0025x | 0.0017x | 0.001x |" in text
    assert "| cpu | 10.000 | 10.0 | 50% | 3.00x | 2.00x | 1.20x |" in text


def test_plot_is_log_scaled_with_bars_from_one(tmp_path, monkeypatch):
    """Speed-ups of 0.01x and 0.5x were both slivers at 0 on a linear axis."""
    from matplotlib.figure import Figure

    seen = {}

    def savefig(fig, path, **kw):
        ax = fig.axes[0]
        seen["scale"] = ax.get_xscale()
        seen["bars"] = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    monkeypatch.setattr(Figure, "savefig", savefig)
    report.plot(fake_results(), tmp_path / "p.png")
    assert seen["scale"] == "log"
    expected = sorted([(1.0, 3.0), (1.0, 2.5), (1.0, 1.5)])      # cpu, plain_batch_norm, loop vs eager
    assert [tuple(round(v, 9) for v in bar) for bar in seen["bars"]] == expected


def test_no_benchmarks_is_an_error(tmp_path):
    import pytest

    path = tmp_path / "r.json"
    path.write_text(json.dumps({**fake_results(), "benchmarks": []}))
    with pytest.raises(SystemExit, match="no benchmark results in .*r.json"):
        report.main([str(path), "--plot", str(tmp_path / "p.png"), "--tuning-table", str(tmp_path / "t.json")])
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "t.json").exists()


def test_unwritable_output_is_one_line_naming_it(tmp_path):
    import pytest

    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_results()))
    for option in ("--out", "--plot", "--tuning-table"):
        target = tmp_path / "missing_dir" / "file"
        with pytest.raises(SystemExit, match=f"cannot write {target}"):
            report.main([str(path), option, str(target)])


def test_header_names_the_cpu_kernel_build(tmp_path):
    data = fake_results()
    data["machine_info"].update(tsbn_cpu_isa="avx512", torch_cpu_capability="AVX512")
    assert "C++ CPU kernels: avx512 build (torch CPU capability AVX512)" in report.markdown(data).splitlines()[0]
    assert "C++ CPU kernels" not in report.markdown(fake_results()).splitlines()[0]   # results from before the hook
