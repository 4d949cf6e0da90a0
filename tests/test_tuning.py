"""Tuning tables: backend="auto" and the Triton tiles follow the measured winner for the nearest shape."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tsbn_kernels as tk
from benchmarks import report
from conftest import make_input, make_params
from tsbn_kernels import dispatch, reference, tuning

TRITON = "triton" in tk.available_backends("cpu")


def write_table(path, backend=(), triton=()):
    path.write_text(json.dumps({"device_name": "test", "backend": list(backend), "triton": list(triton)}))
    tuning._load.cache_clear()
    return path


def entry(best, *, numel, channels, dtype="float32", layout="nchw", training=True, op="ts_batch_norm"):
    return {"op": op, "training": training, "dtype": dtype, "layout": layout, "numel": numel, "channels": channels,
            "best": best}


def test_nearest_measured_shape_decides(tmp_path, monkeypatch):
    monkeypatch.setenv("TSBN_TUNING_TABLE", str(write_table(tmp_path / "t.json", backend=[
        entry("triton", numel=6 * 16 * 100, channels=16), entry("cuda", numel=24 * 256 * 6912, channels=256),
        entry("cuda", numel=6 * 16 * 100, channels=16, layout="channels_last"),
        entry("triton", numel=6 * 16 * 100, channels=16, training=False)])))
    small = torch.randn(6, 16, 10, 12)
    large = torch.randn(24, 256, 60, 100)
    def choose(x, training=True, candidates=("cuda", "triton"), op="ts_batch_norm"):
        return tuning.choose_backend("cuda", tuning.shape_key(op, x, training), list(candidates))
    assert choose(small) == "triton"
    assert choose(large) == "cuda"
    assert choose(small.to(memory_format=torch.channels_last)) == "cuda"
    assert choose(small, training=False) == "triton"
    # no entry for the dtype, or the winner is not available: no opinion
    assert choose(small.bfloat16()) is None
    assert choose(small, candidates=["cuda"]) == "cuda"
    assert choose(small, op="ts_layer_norm") is None


def test_unreadable_table_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    tuning._load.cache_clear()
    monkeypatch.setenv("TSBN_TUNING_TABLE", str(bad))
    with pytest.raises(ValueError, match="bad.json"):
        tuning.table_for(torch.device("cpu"))


@pytest.mark.skipif(not TRITON or "cpu" not in tk.available_backends("cpu"),
                    reason="needs the C++ CPU kernel and Triton (TRITON_INTERPRET=1)")
def test_auto_follows_the_table_between_two_fused_backends(tmp_path, monkeypatch):
    # On CUDA auto chooses between cuda and triton; here the same code path chooses between cpu and triton.
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("cpu", "triton", "eager"))
    monkeypatch.setenv("TSBN_TUNING_TABLE", str(write_table(tmp_path / "t.json", backend=[
        entry("triton", numel=6 * 16 * 120, channels=16)])))
    x = torch.randn(6, 16, 10, 12)
    assert dispatch.resolve("auto", x.device, "ts_batch_norm", x, True)[0] == "triton"
    assert dispatch.resolve("auto", x.device, "ts_batch_norm", x.double(), True)[0] == "cpu"   # not measured
    assert dispatch.resolve("auto", x.device, "ts_batch_norm", None)[0] == "cpu"
    monkeypatch.setenv("TSBN_BACKEND", "cpu")                     # an explicit override still wins
    assert dispatch.resolve("auto", x.device, "ts_batch_norm", x, True)[0] == "cpu"


@pytest.mark.skipif(not TRITON, reason="needs Triton (a GPU, or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_runs_the_tabled_tiles_and_stays_correct(tmp_path, monkeypatch, channels_last):
    from tsbn_kernels.kernels import triton_ts_batch_norm as ttbn

    g = torch.Generator().manual_seed(3)
    x = make_input((6, 12, 7, 9), torch.float32, channels_last=channels_last, offset=2.0, generator=g)
    weight, bias, rm, rv = make_params(3, 12, torch.float32, generator=g)
    tiles = {"block_c": 8, "block_s": 16, "num_warps": 2}
    monkeypatch.setenv("TSBN_TUNING_TABLE", str(write_table(tmp_path / "t.json", triton=[
        entry(tiles, numel=x.numel(), channels=12, layout="channels_last" if channels_last else "nchw")])))
    grid = ttbn.grid_for(x, True)
    assert (grid.block_c, grid.block_s, grid.num_warps) == (8, 16, 2)
    x.requires_grad_(True)
    y = tk.ts_batch_norm(x, weight, bias, rm.clone(), rv.clone(), backend="triton")
    want = reference.ts_batch_norm(x.double(), weight.double(), bias.double(), num_tasks=3)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    grad = torch.randn(x.shape, generator=g)
    (dx,) = torch.autograd.grad(y, x, grad)
    (dx_want,) = torch.autograd.grad(want, x, grad.double())
    torch.testing.assert_close(dx.double(), dx_want.double(), rtol=1e-4, atol=1e-4)
    with ttbn.tile_config(4, 24):
        with pytest.raises(ValueError, match="block_s must be a power of two"):
            tk.ts_batch_norm(x, weight, bias, backend="triton")


def test_report_writes_the_backend_winners(tmp_path):
    def bench(group, contender, median, shape):
        return {"group": group, "name": contender, "stats": {"median": median},
                "extra_info": {"contender": contender, "shape": shape, "device_name": "GPU X"}}
    shape = [24, 256, 72, 96]
    data = {"commit_info": {"id": "abc"}, "benchmarks": [
        bench("ts_batch_norm/forward_backward/nyuv2/bfloat16/channels_last", "cuda", 2.0, shape),
        bench("ts_batch_norm/forward_backward/nyuv2/bfloat16/channels_last", "triton", 1.0, shape),
        bench("ts_batch_norm/forward_backward/nyuv2/bfloat16/channels_last", "eager", 0.5, shape),  # not fused
        bench("ts_batch_norm/forward/nyuv2/bfloat16/channels_last", "cuda", 0.1, shape),   # fwd+bwd decides
        bench("ts_batch_norm/forward/nyuv2/bfloat16/channels_last", "triton", 0.2, shape),
        bench("ts_batch_norm/eval/nyuv2/bfloat16/channels_last", "cuda", 0.1, shape),
        bench("ts_batch_norm/eval/nyuv2/bfloat16/channels_last", "triton", 0.2, shape),
        bench("ts_layer_norm/forward/vit/float32", "triton", 0.2, [10, 1024, 384]),      # one fused: no entry
        bench("aggregate/T3/float32", "pcgrad", 0.2, None)]}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"triton": [{"kept": True}]}))
    assert report.write_tuning_table(data, path) == 2
    table = json.loads(path.read_text())
    assert table["triton"] == [{"kept": True}] and table["device_name"] == "GPU X"
    by_training = {e["training"]: e for e in table["backend"]}
    assert by_training[True]["best"] == "triton" and by_training[False]["best"] == "cuda"
    assert by_training[True]["numel"] == 24 * 256 * 72 * 96 and by_training[True]["channels"] == 256
    assert by_training[True]["layout"] == "channels_last" and by_training[True]["dtype"] == "bfloat16"


@pytest.mark.skipif(not TRITON, reason="needs Triton (a GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_triton_sweep_keeps_correct_configs_and_picks_the_fastest(monkeypatch):
    from benchmarks import tune_triton
    from benchmarks.shapes import NormCase
    from tsbn_kernels.kernels import triton_ts_batch_norm as ttbn

    def fake_time(step, bytes_moved, rotate=None, graph=True):
        step()
        tiles = ttbn._forced_tiles
        return (1.0 if tiles is None else 1.0 / (tiles["block_c"] * tiles["block_s"])), "events"

    broken = (16, 64, 4)                                  # the "fastest" config computes garbage: rejected
    real_grid_for = ttbn.grid_for

    def grid_for(x, training):
        grid = real_grid_for(x, training)       # the broken config forgets all positions past the first
        return dataclasses.replace(grid, s=1) \
            if ttbn._forced_tiles and tuple(ttbn._forced_tiles.values()) == broken else grid
    monkeypatch.setattr(tune_triton, "device_time", fake_time)
    monkeypatch.setattr(tune_triton, "candidates", lambda channels_last, quick: [(4, 16, 4), (8, 32, 4), broken])
    monkeypatch.setattr(ttbn, "grid_for", grid_for)
    entry_ = tune_triton.sweep(NormCase("t", (6, 12, 7, 9), 3), torch.float32, True, True, quick=True)
    assert entry_["best"] == {"block_c": 8, "block_s": 32, "num_warps": 4}
    assert entry_["rejected"] == ["16x64w4"] and entry_["heuristic_s"] == 1.0
    assert entry_["layout"] == "channels_last" and entry_["numel"] == 6 * 12 * 63 and entry_["training"]


COMPILE_FIRST = r"""
import json, os, sys, torch, tsbn_kernels as tk
from tsbn_kernels import dispatch
graphs = []
def capture(gm, inputs):
    graphs.append(str(gm.graph))
    return gm.forward
if sys.argv[1] == "tabled":
    dispatch.AUTO_ORDER["cpu"] = ("cpu", "triton", "eager")
m = tk.TSBatchNorm2d(16, num_tasks=3)
x = torch.randn(6, 16, 10, 12)
y = torch.compile(m, fullgraph=True, backend=capture)(x)     # before any eager call: nothing imported yet
torch.testing.assert_close(y, m(x))
print("triton_bn_forward" in graphs[0], "ts_bn_forward" in graphs[0])
"""


def test_import_leaves_dynamo_unloaded_and_marks_the_choice_as_dynamo_does():
    """``import tsbn_kernels`` does not import torch._dynamo (0.8 s: every DataLoader worker a spawn start method
    makes imports the dataset's module, and so us), so dispatch marks its constant-result function itself: the
    mark must be the one torch.compiler.assume_constant_result sets (the compile-first test below compiles with
    it)."""
    import subprocess
    import sys

    code = "import sys, tsbn_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    ours, public = dispatch._mark_constant(lambda: 0), torch.compiler.assume_constant_result(lambda: 0)
    assert vars(ours) == vars(public) and vars(public)


@pytest.mark.parametrize("mode", ["plain", "tabled"])
def test_fullgraph_compile_before_any_eager_call(tmp_path, mode):
    """The backend choice (lazy kernel imports, the environment) is evaluated once at trace time, even when the
    kernel modules were never imported before; a tuning table does not change compiled code."""
    import os
    import subprocess
    import sys

    if mode == "tabled" and (not TRITON or "cpu" not in tk.available_backends("cpu")):
        pytest.skip("needs the C++ CPU kernel and Triton (TRITON_INTERPRET=1)")
    table = write_table(tmp_path / "t.json", backend=[entry("triton", numel=6 * 16 * 120, channels=16)])
    env = {**os.environ, "TSBN_TUNING_TABLE": str(table)}
    out = subprocess.run([sys.executable, "-c", COMPILE_FIRST, mode], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    uses_triton, uses_cpp = out.stdout.split()
    if "cpu" in tk.available_backends("cpu"):     # compiled code keeps the fixed order (tuning.shape_key)
        assert (uses_triton, uses_cpp) == ("False", "True")
