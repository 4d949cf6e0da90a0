"""Gate analysis: measures on hand-made gates, extraction from modules and checkpoints, the CLI and report, and
validation on a planted multi-task structure (two related tasks, one conflicting)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import tsbn_kernels as tk
from tsbn_kernels import analysis, mtl
from tsbn_kernels.analysis import LayerGates

T, D, H = 3, 16, 32


def planted_run(seed: int, run_dir, steps: int = 400):
    """Every weight shared (the head too); only the TSσBN gates can tell tasks apart. Task 1 is task 0 plus a
    small perturbation of the same features; task 2 is task 0 negated: it conflicts. Gates start identical
    across tasks, so every difference between them is learned."""
    torch.manual_seed(seed)
    a, b = torch.randn(6), torch.randn(6)

    def batch(n):
        x = torch.randn(n, D)
        y0 = torch.tanh(x[:, :6] @ a / 2)
        return x, torch.stack([y0, y0 + 0.2 * torch.tanh(x[:, :6] @ b / 2), -y0])

    model = nn.Sequential(nn.Linear(D, H), tk.TSBatchNorm1d(H, T), nn.ReLU(), nn.Linear(H, H),
                          tk.TSBatchNorm1d(H, T), nn.ReLU(), nn.Linear(H, 1))
    with torch.no_grad():
        for m in model:
            if isinstance(m, tk.TSBatchNorm1d):
                m.weight.copy_(m.weight[0].expand_as(m.weight))
    optimizer = torch.optim.Adam(tk.gate_param_groups(model, lr=3e-3))
    shared = [p for m in model if isinstance(m, nn.Linear) for p in m.parameters()]
    with analysis.TrainingRecorder(run_dir) as recorder:
        for step in range(steps):
            x, y = batch(64)
            losses = ((model(x.repeat(T, 1)).view(T, 64) - y) ** 2).mean(dim=1)
            optimizer.zero_grad()
            if step % 25 == 0:
                G = mtl.autograd_gradients(losses, shared)
                recorder.record(step, model, mtl.gramian(G))
            losses.sum().backward()
            optimizer.step()
    return model, losses.detach()


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_structure(seed, tmp_path):
    model, losses = planted_run(seed, tmp_path)
    assert (losses < 0.1).all(), losses
    affinity = analysis.gate_affinity(analysis.gates_from_module(model))
    for measure in ("cosine", "overlap"):
        a = affinity[measure]
        assert a[0, 1] > a[0, 2] + 0.1 and a[0, 1] > a[1, 2] + 0.1, (measure, a)
    record = analysis.load_record(tmp_path / "analysis" / "record.npz")
    cos = analysis.gradient_cosine(record["gramians"])
    assert cos[0, 1] > 0.5 and cos[0, 2] < -0.1 and cos[1, 2] < -0.1, cos
    assert len(record["steps"]) == 16 and len(record["trajectories"]) == 2


def test_capacity_and_affinity_on_hand_made_gates():
    gates = np.array([[0.9, 0.9, 0.1, 0.1, 0.9],
                      [0.9, 0.1, 0.9, 0.1, 0.1],
                      [0.1, 0.1, 0.1, 0.1, 0.2]])
    cap = analysis.capacity(LayerGates("l", gates, "sigmoid"), tau=0.5)
    np.testing.assert_allclose(cap["open"], [0.6, 0.4, 0.0])
    assert cap["shared"] == pytest.approx(0.2) and cap["specialized"] == pytest.approx(0.6)
    assert cap["closed"] == pytest.approx(0.2)
    np.testing.assert_allclose(cap["private"], [0.4, 0.2, 0.0])
    overlap = analysis.gate_affinity([LayerGates("l", gates, "sigmoid")])["overlap"]
    assert overlap[0, 1] == pytest.approx(1 / 4) and overlap[2, 2] == 1.0
    M = np.array([[4.0, -2.0], [-2.0, 1.0]])
    np.testing.assert_allclose(analysis.gradient_cosine([M, M]), [[1, -1], [-1, 1]])


def test_gates_from_state_dict_match_module():
    model = tk.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 4)), T)
    model.add_module("ln", tk.TSLayerNorm(6, T))
    from_module = analysis.gates_from_module(model)
    from_state = analysis.gates_from_state_dict(model.state_dict(), num_tasks=T)
    assert [g.name for g in from_state] == [g.name for g in from_module] == ["1", "ln"]
    for a, b in zip(from_module, from_state):
        np.testing.assert_allclose(a.values, b.values)
    plain = analysis.gates_from_state_dict(tk.convert_batchnorm(nn.BatchNorm1d(5), T, gate="none").state_dict(),
                                          gate="none")
    assert plain[0].values.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no task-specific norm gates"):
        analysis.gates_from_state_dict(nn.Linear(3, 3).state_dict())


def test_cli_on_run_directory_and_checkpoint(tmp_path, capsys):
    model, _ = planted_run(0, tmp_path, steps=60)
    (tmp_path / "config.json").write_text(json.dumps({"benchmark": "planted", "norm": "tssigmabn", "num_tasks": T,
                                                      "task_names": ["y0", "y0+", "-y0"]}))
    torch.save({"model": model.state_dict(), "step": 60}, tmp_path / "checkpoint.pt")
    assert analysis.main([str(tmp_path)]) == 0
    out = tmp_path / "analysis"
    page = (out / "report.html").read_text()
    assert "gradient cosine" in page.lower() and page.count("data:image/png;base64") == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_names"] == ["y0", "y0+", "-y0"] and len(summary["gradient_cosine"]) == T
    assert analysis.main([str(tmp_path / "checkpoint.pt"), "--tau", "0.6"]) == 0
    assert (tmp_path / "checkpoint_analysis" / "report.html").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        analysis.main([str(tmp_path / "missing.pt")])
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*broken.pt"):
        analysis.main([str(tmp_path / "broken.pt")])


def test_cli_says_when_a_run_has_no_gates(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    torch.save({"model": model.state_dict(), "step": 1}, tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps({"norm": "bn", "num_tasks": 2}))
    with pytest.raises(SystemExit, match="--norm bn .*no task-specific gates"):
        analysis.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="checkpoint.pt: no task-specific norm gates"):
        analysis.main([str(tmp_path / "checkpoint.pt")])


@pytest.mark.parametrize("bench,width", [("nyuv2", 4), ("celeba", 5), ("pascal", 4)])
def test_state_dict_gates_are_the_norm_layers_of_a_pipeline_model(bench, width):
    """NYUv2 (T=3) has a 3-channel normal classifier conv with a bias and CelebA at width 5 (T=40) has bias-free
    40-channel convs: neither is a TS layer norm, whatever num_tasks says."""
    from tsbn_kernels.pipeline.models import build_model

    model = build_model(bench, width=width, head_width=8, image_size=(32, 32))
    from_module = analysis.gates_from_module(model)
    from_state = analysis.gates_from_state_dict(model.state_dict(), num_tasks=model.num_tasks)
    assert [g.name for g in from_state] == [g.name for g in from_module]
    for a, b in zip(from_module, from_state):
        np.testing.assert_allclose(a.values, b.values)


def test_cli_on_a_checkpoint_file_reads_the_run_config_it_carries(tmp_path):
    """tsbn-train's checkpoint holds the run's config: a TSBN run's γ are no sigmoid logits, and a ViT's TS layer
    norms (no buffers) are found only with num_tasks."""
    model = nn.Sequential(nn.Linear(4, 4), tk.TSLayerNorm(4, 2, gate="none"))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 2.0, 0.5, 0.5], [2.0, 0.5, 0.5, 0.5]]))
    config = {"norm": "tsbn", "num_tasks": 2, "task_names": ["a", "b"]}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "checkpoint.pt")
    assert analysis.main([str(tmp_path / "checkpoint.pt")]) == 0
    summary = json.loads((tmp_path / "checkpoint_analysis" / "summary.json").read_text())
    assert list(summary["layers"]) == ["1"] and summary["task_names"] == ["a", "b"]
    np.testing.assert_allclose(summary["layers"]["1"]["open"], [0.5, 0.25])    # |γ| / max |γ| > 0.5
    torch.save({"model": model.state_dict(), "config": {**config, "norm": "bn"}}, tmp_path / "bn.pt")
    with pytest.raises(SystemExit, match="--norm bn"):
        analysis.main([str(tmp_path / "bn.pt")])


def test_cli_errors_name_the_path(tmp_path):
    """A directory that is no run, an unreadable record or config.json, an output path that cannot be written:
    one line naming the path instead of a traceback."""
    with pytest.raises(SystemExit, match=f"{tmp_path} is not a tsbn-train run directory"):
        analysis.main([str(tmp_path)])
    model = tk.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), T)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "record.npz").write_text("truncated")
    with pytest.raises(SystemExit, match="cannot read the training record .*record.npz"):
        analysis.main([str(tmp_path)])
    (tmp_path / "analysis" / "record.npz").unlink()
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read .*config.json"):
        analysis.main([str(tmp_path)])
    (tmp_path / "config.json").unlink()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the report to .*a_file/out"):
        analysis.main([str(tmp_path), "--out", str(tmp_path / "a_file" / "out")])


def test_gradient_cosine_leaves_out_overflowed_steps(tmp_path):
    """tsbn-train --amp fp16 records the Gramian of a step the GradScaler skipped as NaN/inf."""
    M = np.array([[4.0, -2.0], [-2.0, 4.0]])
    nan = np.full((2, 2), np.nan)
    np.testing.assert_allclose(analysis.gradient_cosine([M, nan, np.inf * M]), [[1, -0.5], [-0.5, 1]])
    assert np.isnan(analysis.gradient_cosine([nan])).all()
    layers = [LayerGates("l", np.array([[0.9, 0.1], [0.2, 0.8]]), "sigmoid")]
    for gramians, cosine in (([M, nan], [[1, -0.5], [-0.5, 1]]), ([nan, nan], None)):
        record = {"steps": np.arange(len(gramians)), "gramians": np.stack(gramians), "trajectories": {}}
        analysis.write_report(layers, tmp_path, record=record)
        text = (tmp_path / "summary.json").read_text()
        summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
        if cosine is None:
            assert "gradient_cosine" not in summary
        else:
            np.testing.assert_allclose(summary["gradient_cosine"], cosine)
        assert (tmp_path / "gradient_cosine.png").exists() == (cosine is not None)
        (tmp_path / "gradient_cosine.png").unlink(missing_ok=True)


def test_gate_heatmaps_of_forty_tasks_stay_a_readable_size(tmp_path):
    """CelebA (40 tasks, ResNet-18's 20 norm layers) drew 0.45 in per task: a 30000-px-tall gates.png."""
    from PIL import Image

    from tsbn_kernels.analysis import plots

    rng = np.random.default_rng(0)
    layers = [LayerGates(f"l{i}", rng.random((40, 8)), "sigmoid") for i in range(20)]
    width, height = Image.open(plots.gate_heatmaps(layers, tmp_path / "g.png")).size
    assert height < 8000, (width, height)
    small = [LayerGates(f"l{i}", rng.random((3, 8)), "sigmoid") for i in range(2)]
    assert Image.open(plots.gate_heatmaps(small, tmp_path / "s.png", ["a", "b", "c"])).size[1] > 250


@pytest.mark.parametrize("module", ["tsbn_kernels.analysis.cli", "tsbn_kernels.pipeline.train",
                                    "tsbn_kernels.pipeline.check", "tsbn_kernels.pipeline.data"])
def test_each_command_runs_as_a_module_without_warnings(module):
    """``python -m MODULE --help`` for each command-line tool: no package __init__ imports the module first (runpy
    would warn that it found it in sys.modules and may run it twice)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "RuntimeWarning" not in out.stderr
