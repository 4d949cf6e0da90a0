"""tsbn-train on tiny synthetic data: the loss goes down, resume is bitwise exact, a NaN loss stops the run and
keeps the last good checkpoint, and tsbn-analyze reads the run directory."""
from __future__ import annotations

import csv
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tsbn_kernels import analysis
from tsbn_kernels.pipeline import data, train

TINY = {"nyuv2": ["--size", "16", "24"], "cityscapes": ["--size", "16", "32"], "celeba": ["--size", "16", "16"],
        "pascal": ["--size", "32", "32"]}


def run(dataset, out, *extra):
    return train.main([dataset, "--out", str(out), "--width", "4", "--batch", "2", "--train-size", "8",
                       "--val-size", "4", *TINY[dataset], *extra])


@pytest.mark.parametrize("dataset,aggregator", [("nyuv2", "pcgrad"), ("cityscapes", "mean"),
                                                  ("celeba", "sum"), ("pascal", "upgrad")])
def test_training_reduces_the_loss(dataset, aggregator, tmp_path):
    assert run(dataset, tmp_path, "--epochs", "4", "--lr", "3e-3", "--aggregator", aggregator) == 0
    history = json.loads((tmp_path / "metrics.json").read_text())
    first, last = (sum(h["train_loss"].values()) for h in (history[0], history[-1]))
    assert last < first, [sum(h["train_loss"].values()) for h in history]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5
    for name in ("loss.png", "metrics.png", "gates.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_tasks"] == len(config["task_names"]) and config["norm"] == "tssigmabn"


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    assert run("cityscapes", tmp_path / "full", "--epochs", "2", "--aggregator", "pcgrad") == 0
    assert run("cityscapes", tmp_path / "split", "--epochs", "1", "--aggregator", "pcgrad") == 0
    assert run("cityscapes", tmp_path / "split", "--epochs", "2", "--aggregator", "pcgrad", "--resume") == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert full["step"] == split["step"] == 8
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key


def test_resume_with_only_out_and_epochs_takes_the_runs_own_settings(tmp_path, capsys):
    """README: `tsbn-train nyuv2 --out runs/nyuv2 --epochs 20 --resume`. Every setting not given is the run's own
    (config.json): the same data, width, batch, size and aggregator, so the resumed run equals the uninterrupted
    one. Without that, the defaults came back (--data synthetic) and a resume trained on other data, only warned."""
    assert data.main(["synth", "cityscapes", "--out", str(tmp_path / "d"), "--n", "10", "--size", "16", "32"]) == 0
    settings = ["--data", str(tmp_path / "d"), "--width", "4", "--batch", "2", "--aggregator", "pcgrad",
                "--lr", "3e-3", *TINY["cityscapes"]]
    assert train.main(["cityscapes", "--out", str(tmp_path / "full"), *settings, "--epochs", "2"]) == 0
    assert train.main(["cityscapes", "--out", str(tmp_path / "split"), *settings, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert train.main(["cityscapes", "--out", str(tmp_path / "split"), "--epochs", "2", "--resume"]) == 0
    assert "changed settings" not in capsys.readouterr().err
    assert not (tmp_path / "split" / "data").exists()          # no synthetic data was made
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert full["step"] == split["step"]
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    # Given anew, a setting that shapes the model is refused and one that does not is reported.
    with pytest.raises(SystemExit, match=r"started with --width 4 \(now 8\)"):
        train.main(["cityscapes", "--out", str(tmp_path / "split"), "--epochs", "3", "--resume", "--width", "8"])
    assert train.main(["cityscapes", "--out", str(tmp_path / "split"), "--epochs", "3", "--resume",
                       "--lr", "1e-3"]) == 0
    assert "changed settings (the run will not reproduce an uninterrupted one): lr: 0.003 -> 0.001" in \
        capsys.readouterr().err


def test_resume_adopts_the_runs_settings_but_not_its_pretrained_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"args": {
        "benchmark": "cityscapes", "data": "/data/cityscapes", "width": 16, "batch": 3, "size": [32, 64],
        "aggregator": "cagrad", "epochs": 5, "pretrained": "/moved/resnet50.pth"}}))
    args = train.parse(["cityscapes", "--out", str(tmp_path), "--resume", "--batch", "2"])
    assert (args.data, args.width, args.size, args.aggregator) == ("/data/cityscapes", 16, [32, 64], "cagrad")
    assert args.batch == 2 and args.epochs == 1          # given, and free to change
    assert args.pretrained is None                       # the checkpoint holds the weights


def test_resume_after_a_steps_stop_mid_epoch_trains_the_rest_of_that_epoch_bitwise(tmp_path):
    # 4 steps per epoch: the first run stops inside epoch 1, the resumed one crosses into epoch 2 and stops inside.
    assert run("cityscapes", tmp_path / "full", "--epochs", "2", "--steps", "6", "--aggregator", "pcgrad") == 0
    assert run("cityscapes", tmp_path / "split", "--epochs", "2", "--steps", "3", "--aggregator", "pcgrad") == 0
    partial = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [(h["epoch"], h["step"], h.get("partial")) for h in partial] == [(1, 3, True)]
    assert run("cityscapes", tmp_path / "split", "--epochs", "2", "--steps", "6", "--aggregator", "pcgrad",
               "--resume") == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert full["step"] == split["step"] == 6 and full["epoch"] == split["epoch"] == 1
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["progress"]["samples"] == split["progress"]["samples"] == 4
    assert [(h["epoch"], h["step"], h.get("partial"), h["train_loss"]) for h in full["history"]] == \
        [(h["epoch"], h["step"], h.get("partial"), h["train_loss"]) for h in split["history"]]
    assert [h["epoch"] for h in split["history"]] == [1, 2]


def test_run_directory_is_never_overwritten_or_resumed_with_another_model(tmp_path, capsys):
    assert run("cityscapes", tmp_path, "--epochs", "1") == 0
    saved = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "config.json")}
    with pytest.raises(SystemExit, match="already holds a run"):
        run("cityscapes", tmp_path, "--epochs", "1")
    with pytest.raises(SystemExit, match=r"started with --norm 'tssigmabn' \(now 'bn'\)"):
        run("cityscapes", tmp_path, "--epochs", "2", "--norm", "bn", "--resume")
    with pytest.raises(SystemExit, match="--width 4 \\(now 8\\)"):
        train.main(["cityscapes", "--out", str(tmp_path), "--width", "8", "--resume", *TINY["cityscapes"]])
    for name, content in saved.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert run("cityscapes", tmp_path, "--epochs", "2", "--lr", "1e-3", "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings" in err and "lr: 0.0001 -> 0.001" in err
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["name"]: g["lr"] for g in groups} == {"shared": 1e-3, "gates": pytest.approx(1e-2)}   # gates at 10×


def test_missing_or_corrupt_data_is_one_line_naming_the_file(tmp_path, capsys):
    assert data.main(["synth", "cityscapes", "--out", str(tmp_path / "d"), "--n", "4", "--size", "16", "32",
                      "--split", "train"]) == 0
    assert data.main(["synth", "cityscapes", "--out", str(tmp_path / "d"), "--n", "2", "--size", "16", "32",
                      "--split", "val"]) == 0
    (tmp_path / "d" / "train" / "depth" / "1.npy").write_bytes(b"not an array")
    assert run("cityscapes", tmp_path / "run", "--data", str(tmp_path / "d"), "--epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tsbn-train: corrupt data file") and "depth/1.npy" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert run("cityscapes", tmp_path / "run2", "--data", str(tmp_path / "nowhere"), "--epochs", "1") == 2
    assert "tsbn-train: cityscapes: no image folder" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = train.dense_losses

    def poisoned(outputs, batch, **kwargs):
        calls["n"] += 1
        losses = real(outputs, batch, **kwargs)
        return losses * float("nan") if calls["n"] == 6 else losses
    monkeypatch.setattr(train, "dense_losses", poisoned)
    assert run("nyuv2", tmp_path, "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 6" in err
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'} (step 4)" in err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_nan_loss_before_the_first_checkpoint_says_none_was_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "dense_losses", lambda outputs, batch, **kwargs: torch.full((2,), float("nan")))
    assert run("cityscapes", tmp_path, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, step 1" in err and "no checkpoint was written" in err, err
    assert "last good checkpoint" not in err and not (tmp_path / "checkpoint.pt").exists()


def test_tsbn_analyze_reads_a_training_run(tmp_path):
    assert run("nyuv2", tmp_path, "--epochs", "2", "--aggregator", "pcgrad") == 0
    assert analysis.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["task_names"] == ["segmentation", "depth", "normal"] and len(summary["gradient_cosine"]) == 3
    assert "Gate trajectories" in (tmp_path / "analysis" / "report.html").read_text()
    # The run's checkpoint file itself: the training record beside it is read too.
    assert analysis.main([str(tmp_path / "checkpoint.pt")]) == 0
    from_file = json.loads((tmp_path / "checkpoint_analysis" / "summary.json").read_text())
    assert from_file["gradient_cosine"] == summary["gradient_cosine"]


def test_resume_may_add_or_drop_the_baseline(tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"accuracy": 0.9, "f1": 0.7}))
    out = tmp_path / "run"
    fast = ["--norm", "bn", "--aggregator", "sum"]
    assert run("celeba", out, "--epochs", "1", *fast) == 0
    assert run("celeba", out, "--epochs", "2", *fast, "--resume", "--baseline", str(baseline)) == 0
    assert run("celeba", out, "--epochs", "3", *fast, "--resume", "--baseline", "") == 0   # (not given: kept)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["delta_m"] == rows[2]["delta_m"] == "" and float(rows[1]["delta_m"]) > -100
    assert [("delta_m" in h["val"]) for h in json.loads((out / "metrics.json").read_text())] == [False, True, False]
    assert (out / "plots" / "metrics.png").stat().st_size > 1000


def test_a_wrong_baseline_file_stops_before_training(tmp_path, monkeypatch, capsys):
    def no_training(*args):
        raise AssertionError("training started with an unusable --baseline")
    monkeypatch.setattr(train, "make_data", no_training)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"mIoU": 0.7}))
    with pytest.raises(SystemExit, match=r"--baseline .*wrong.json: no key is a metric Δm of cityscapes uses"):
        run("cityscapes", tmp_path / "run", "--baseline", str(wrong))
    wrong.write_text("{not json")
    with pytest.raises(SystemExit, match="wrong.json: Expecting property name"):
        run("cityscapes", tmp_path / "run", "--baseline", str(wrong))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.undo()
    partly = tmp_path / "partly.json"
    partly.write_text(json.dumps({"miou": 0.74, "my_metric": 1.0}))
    assert run("cityscapes", tmp_path / "ok", "--steps", "1", "--baseline", str(partly)) == 0
    assert "not metrics of cityscapes, ignored: ['my_metric']" in capsys.readouterr().err


def test_metrics_json_is_strict_json_with_null_for_nan(tmp_path):
    history = [{"epoch": 1, "step": 2, "train_loss": {"a": 0.5}, "val": {"miou": float("nan"), "abs_err": 0.25}}]
    train.write_metrics(tmp_path, history)

    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.json")
    loaded = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert loaded[0]["val"] == {"miou": None, "abs_err": 0.25}
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "1,2,0.5,nan,0.25"


def test_resume_appends_to_the_training_record(tmp_path):
    assert run("nyuv2", tmp_path, "--epochs", "2", "--aggregator", "pcgrad") == 0
    before = analysis.load_record(tmp_path / "analysis" / "record.npz")
    assert run("nyuv2", tmp_path, "--epochs", "3", "--aggregator", "pcgrad", "--resume") == 0
    after = analysis.load_record(tmp_path / "analysis" / "record.npz")
    assert after["steps"].tolist() == [4, 8, 12] and len(after["gramians"]) == 3
    assert np.array_equal(after["gramians"][:2], before["gramians"])
    for name, snaps in before["trajectories"].items():
        assert after["trajectories"][name].shape[0] == 3 and np.array_equal(after["trajectories"][name][:2], snaps)


def ddp_worker(rank, world, port, argv):
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    assert train.main(argv) == 0


# Cityscapes has ignored labels and invalid depth pixels (2% of the synthetic ones), so the ranks hold different
# numbers of valid pixels: the masked means must divide by the count of the global batch, not each rank's own
# (a parameter error of ~1e-2 after one step). One step only: this tiny model amplifies float64 rounding 100-1000× per
# step (also with every pixel valid), so later steps would compare rounding, not the training.
@pytest.mark.parametrize("dataset,aggregator,steps", [("celeba", "pcgrad", 4), ("celeba", "sum", 4),
                                                        ("cityscapes", "mean", 1), ("cityscapes", "sum", 1)])
def test_two_gloo_ranks_train_as_one_process_on_the_concatenated_batch(tmp_path, dataset, aggregator, steps):
    common = [dataset, "--width", "4", "--train-size", "8", "--val-size", "4", *TINY[dataset], "--epochs", "2",
              "--steps", str(steps), "--aggregator", aggregator, "--optimizer", "sgd", "--lr", "0.05",
              "--dtype", "float64", "--norm", "tssigmabn" if aggregator != "sum" else "bn"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, common + ["--batch", "2", "--out", str(tmp_path / "ddp")]), nprocs=2,
             join=True)
    assert train.main(common + ["--batch", "4", "--out", str(tmp_path / "one")]) == 0
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    assert ddp["step"] == one["step"] == steps and ddp["config"]["world_size"] == 2
    torch.manual_seed(0)
    start = train.build_model(dataset, "tssigmabn" if aggregator != "sum" else "bn", 4, 16).double()
    moved = 0
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-9, atol=1e-11, msg=key)
        if value.is_floating_point() and key in start.state_dict():
            moved += int(not torch.allclose(value, start.state_dict()[key].to(value.dtype)))
    assert moved > 10                                    # training changed the model: the comparison means something
    history = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(history) == len(one["history"]) == (steps + 1) // 2
    assert history[0]["train_loss"].keys() == one["history"][0]["train_loss"].keys()
    for a, b in zip(history, one["history"]):
        for task, value in a["train_loss"].items():
            assert value == pytest.approx(b["train_loss"][task], rel=1e-9)


@pytest.mark.parametrize("dataset", ["pascal", "celeba"])
def test_a_non_square_size_reaches_the_loaders(dataset, tmp_path):
    args = train.parse([dataset, "--size", "32", "64", "--train-size", "4", "--val-size", "2"])
    train.write_synthetic(args, tmp_path)
    for split in train.make_datasets(args, tmp_path):
        assert split[0]["image"].shape == (3, 32, 64)
