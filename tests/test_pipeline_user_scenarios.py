"""Scenarios of a researcher using tsbn-data / tsbn-train / tsbn-analyze that went wrong: interrupts between the
files of an epoch's end, data files missing from the validation split, argument combinations that gave tracebacks.
Tiny shapes, a few steps."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from tsbn_kernels import analysis
from tsbn_kernels.pipeline import celeba_data, data, dense_data, pascal_data, train

TINY = ["--width", "4", "--batch", "2", "--train-size", "4", "--val-size", "2", "--aggregator", "pcgrad"]


def run(out, *extra, benchmark="cityscapes", size=("16", "32")):
    try:
        return train.main([benchmark, "--out", str(out), "--size", *size, *TINY, *extra])
    except KeyboardInterrupt:   # (not pytest's own: the tests below raise it inside the run)
        pytest.fail("an interrupt escaped tsbn-train as a traceback instead of its message and status")


def test_an_interrupt_between_the_checkpoint_and_the_record_leaves_a_consistent_run(tmp_path, monkeypatch, capsys):
    # The uninterrupted run: 2 steps per epoch, 3 epochs.
    assert run(tmp_path / "full", "--epochs", "3") == 0
    # Ctrl-C while the plots of epoch 2 are drawn, after its checkpoint is on disk: the record used to be written
    # last, so it lacked epoch 2's snapshot for good (the resumed run then had 2 snapshots, the full one 3).
    real_save_plots, calls = train.save_plots, []

    def interrupted_at_the_second_epoch(out, history, model):
        calls.append(len(history))
        if len(history) == 2:
            raise KeyboardInterrupt
        real_save_plots(out, history, model)
    monkeypatch.setattr(train, "save_plots", interrupted_at_the_second_epoch)
    assert run(tmp_path / "cut", "--epochs", "3") == 130
    assert "interrupted at step 4" in capsys.readouterr().err
    monkeypatch.setattr(train, "save_plots", real_save_plots)
    assert sorted(p.name for p in (tmp_path / "cut").rglob("*tmp*")) == []
    # metrics.json lagged the checkpoint (epoch 1 only): a resume rewrites it from the checkpoint's history.
    assert run(tmp_path / "cut", "--epochs", "3", "--resume") == 0
    full = analysis.load_record(tmp_path / "full" / "analysis" / "record.npz")
    cut = analysis.load_record(tmp_path / "cut" / "analysis" / "record.npz")
    assert full["steps"].tolist() == cut["steps"].tolist() == [2, 4, 6]
    assert np.array_equal(full["gramians"], cut["gramians"])
    for name, snaps in full["trajectories"].items():
        assert np.array_equal(snaps, cut["trajectories"][name]), name
    assert (tmp_path / "full" / "metrics.csv").read_text() == (tmp_path / "cut" / "metrics.csv").read_text()


def test_a_record_ahead_of_the_checkpoint_is_cut_back_on_resume(tmp_path, monkeypatch):
    # An interrupt after the record's save but before the checkpoint's: the record holds a step the checkpoint
    # does not, which the resumed run records again.
    assert run(tmp_path / "full", "--epochs", "2") == 0
    real_atomic_save = train.atomic_save
    saves = []

    def interrupted_second_checkpoint(obj, path):
        saves.append(obj["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_atomic_save(obj, path)
    monkeypatch.setattr(train, "atomic_save", interrupted_second_checkpoint)
    assert run(tmp_path / "cut", "--epochs", "2") == 130
    monkeypatch.setattr(train, "atomic_save", real_atomic_save)
    assert analysis.load_record(tmp_path / "cut" / "analysis" / "record.npz")["steps"].tolist() == [2, 4]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert run(tmp_path / "cut", "--epochs", "2", "--resume") == 0
    full = analysis.load_record(tmp_path / "full" / "analysis" / "record.npz")
    cut = analysis.load_record(tmp_path / "cut" / "analysis" / "record.npz")
    assert cut["steps"].tolist() == [2, 4] and np.array_equal(full["gramians"], cut["gramians"])


def test_an_interrupt_inside_a_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if str(f).endswith(".pt.tmp"):
            raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", save_then_interrupt)
    assert run(tmp_path, "--epochs", "1") == 130
    assert not (tmp_path / "checkpoint.pt.tmp").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    # A scheduler's SIGTERM used to kill the process with no message; now it raises where the run is.
    real_evaluate = train.evaluate

    def terminated_in_evaluation(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", terminated_in_evaluation)

    def outside_tsbn_train(signum, frame):   # what runs when tsbn-train installs no handler of its own
        raise RuntimeError("SIGTERM was not handled by tsbn-train")
    before = signal.signal(signal.SIGTERM, outside_tsbn_train)
    try:
        assert run(tmp_path, "--epochs", "1") == 143
        assert signal.getsignal(signal.SIGTERM) is outside_tsbn_train   # tsbn-train's only while it runs
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "terminated (SIGTERM) at step 2; no checkpoint was written yet" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_repairs_its_metrics(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "1") == 0
    (tmp_path / "metrics.json").unlink()
    assert run(tmp_path, "--epochs", "1", "--resume") == 0
    assert "nothing to train" in capsys.readouterr().err
    assert [h["step"] for h in json.loads((tmp_path / "metrics.json").read_text())] == [2]


def test_a_missing_validation_file_stops_the_run_before_training(tmp_path, monkeypatch):
    dense_data.synthesize("cityscapes", tmp_path / "data", 4, "train", size=(16, 32))
    dense_data.synthesize("cityscapes", tmp_path / "data", 2, "val", seed=1, size=(16, 32))
    (tmp_path / "data" / "val" / "depth" / "1.npy").unlink()
    steps = []
    monkeypatch.setattr(train.torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(FileNotFoundError, match=r"missing data file .*val/depth/1\.npy"):
        data.DenseDataset("cityscapes", tmp_path / "data", "val")
    assert run(tmp_path / "run", "--data", str(tmp_path / "data"), "--epochs", "1") == 2
    assert steps == []                       # it used to train the whole first epoch, then fail in evaluation


def test_missing_celeba_and_pascal_files_are_found_when_the_split_is_opened(tmp_path):
    celeba_data.synthesize(tmp_path / "celeba", 5)
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing CelebA image .*000002.jpg"):
        data.CelebA(tmp_path / "celeba", "train")
    pascal_data.synthesize(tmp_path / "pascal", 4, size=(16, 16))
    val_id = (tmp_path / "pascal" / "ImageSets" / "Context" / "val.txt").read_text().split()[0]
    (tmp_path / "pascal" / "sal_distill" / f"{val_id}.png").unlink()
    pascal_data.PascalContext(tmp_path / "pascal", "train", 16)
    with pytest.raises(FileNotFoundError, match=f"sal_distill/{val_id}.png"):
        pascal_data.PascalContext(tmp_path / "pascal", "val", 16)


def test_synthetic_celeba_of_a_few_images_has_a_validation_split(tmp_path):
    # tsbn-data synth celeba --n 6: round(0.8·6) = round(0.9·6) = 5 gave an empty val split, and tsbn-train then
    # reported NaN accuracy without a word.
    assert data.main(["synth", "celeba", "--out", str(tmp_path), "--n", "6"]) == 0
    assert [len(data.CelebA(tmp_path, s, 16)) for s in ("train", "val", "test")] == [4, 1, 1]
    lines = (tmp_path / "list_eval_partition.txt").read_text().splitlines()
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(line[:-1] + "0" for line in lines) + "\n")
    with pytest.raises(ValueError, match="assigns no image to the val split"):
        data.CelebA(tmp_path, "val", 16)


@pytest.mark.parametrize("name,size", [("nyuv2", ("24", "32")), ("cityscapes", ("16", "32")),
                                            ("celeba", ("16", "16")), ("pascal", ("32", "32"))])
def test_the_readme_flow_synth_then_train_on_the_directory(name, size, tmp_path):
    # README: `tsbn-data synth nyuv2 --out data/nyuv2 --n 64` then `tsbn-train nyuv2 --data data/nyuv2`. synth
    # wrote NYUv2 / Cityscapes' train split only, and the training run stopped at the missing val folder.
    # (`name`, not `benchmark`: that is pytest-benchmark's fixture.)
    assert data.main(["synth", name, "--out", str(tmp_path / "data"), "--n", "12", "--size", *size]) == 0
    assert train.main([name, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--size", *size,
                       "--width", "4", "--batch", "1", "--steps", "1"]) == 0
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_batch_larger_than_the_split_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="has 4 samples, fewer than one batch of --batch 8"):
        train.main(["cityscapes", "--out", str(tmp_path), "--size", "16", "32", "--width", "4", "--batch", "8",
                    "--train-size", "4", "--val-size", "2"])


def test_sizes_the_model_cannot_take_are_refused_by_the_parser(capsys):
    # The ViT's patch size used to surface as a ValueError traceback from the model's constructor.
    with pytest.raises(SystemExit):
        train.parse(["pascal", "--size", "30", "42"])
    assert "multiples of its patch size 16" in capsys.readouterr().err
    assert train.parse(["pascal", "--size", "30", "42", "--arch", "resnet50"]).size == [30, 42]
    with pytest.raises(SystemExit):
        train.parse(["cityscapes", "--size", "0", "32"])
    assert "--size must be positive" in capsys.readouterr().err


def test_steps_alone_trains_that_many_steps_across_epochs(tmp_path, capsys):
    # --steps 5 without --epochs stopped after the default single epoch (2 steps here), without a word.
    assert run(tmp_path, "--steps", "5") == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and [(h["epoch"], h.get("partial")) for h in state["history"]] == \
        [(1, None), (2, None), (3, True)]
    # Both limits: whichever comes first.
    assert run(tmp_path / "both", "--steps", "5", "--epochs", "1") == 0
    assert torch.load(tmp_path / "both" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert train.parse(["nyuv2"]).epochs == 1
    with pytest.raises(SystemExit):
        train.parse(["nyuv2", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_a_backend_that_cannot_run_here_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--backend 'bogus' cannot run ts_batch_norm on cpu; available there"):
        run(tmp_path, "--backend", "bogus")
    assert not (tmp_path / "data").exists()       # said before the synthetic data is written
    with pytest.raises(SystemExit, match="cannot run ts_layer_norm"):
        run(tmp_path, "--backend", "bogus", benchmark="pascal", size=("32", "32"))
    assert run(tmp_path / "bn", "--backend", "bogus", "--norm", "bn", "--steps", "1") == 0   # no TS norm to run


@pytest.mark.parametrize("argv,message", [
    (["cityscapes", "--backend", "bogus"], "cannot run ts_batch_norm"),
    (["pascal", "--backend", "bogus"], "cannot run ts_layer_norm"),
    (["cityscapes", "--steps", "0"], "at least 1"),
    (["cityscapes", "--batch", "0"], "at least 1"),
    (["pascal", "--size", "30", "30"], "multiples of 16"),
    (["all", "--size", "30", "30"], "multiples of 16"),
])
def test_tsbn_check_usage_errors_exit_2_not_the_mismatch_status(argv, message, capsys):
    # They were tracebacks (status 1: what a MISMATCH exits with), or with --steps 0 a check of nothing.
    from tsbn_kernels.pipeline import check
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_warns_of_the_global_batch(tmp_path, capsys):
    # --batch is per process: a 2-process run resumed by one process trains on half the global batch, which
    # the resume did not mention (world_size is in config.json, not in its args).
    assert run(tmp_path, "--steps", "1") == 0
    config = json.loads((tmp_path / "config.json").read_text())
    config["world_size"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume") == 0
    assert "processes: 2 -> 1 (global batch 4 -> 2)" in capsys.readouterr().err


@pytest.mark.parametrize("value", [255, 7, 2.5])
def test_a_label_outside_the_classes_names_its_file(tmp_path, value):
    # A 255-ignore label (another preprocessing's convention) in a val file surfaced as a traceback from the
    # metrics after the training epoch, naming no file.
    dense_data.synthesize("cityscapes", tmp_path, 2, "val", size=(8, 16))
    path = tmp_path / "val" / "label_7" / "1.npy"
    label = np.load(path).astype(np.float64 if value == 2.5 else np.int64)
    label[3, 5] = value
    np.save(path, label)
    dataset = data.DenseDataset("cityscapes", tmp_path, "val")
    assert dataset[0]["segmentation"].max() <= 6
    with pytest.raises(ValueError, match=r"label_7/1\.npy holds label .*outside the cityscapes classes"):
        dataset[1]


def test_a_sample_of_another_size_names_its_file(tmp_path):
    # One image re-exported at another resolution: default_collate's "stack expects each tensor to be equal size"
    # from the middle of an epoch named no file.
    dense_data.synthesize("cityscapes", tmp_path, 3, "train", size=(8, 16))
    dense_data.synthesize("cityscapes", tmp_path / "other", 1, "train", size=(8, 12))
    for folder in ("image", "label_7", "depth"):
        (tmp_path / "other" / "train" / folder / "0.npy").replace(tmp_path / "train" / folder / "2.npy")
    dataset = data.DenseDataset("cityscapes", tmp_path, "train")
    assert dataset[1]["image"].shape == (3, 8, 16)
    with pytest.raises(ValueError, match=r"image/2\.npy is 8x12, but .*image/0\.npy is 8x16"):
        dataset[2]


def test_synthetic_data_of_other_settings_is_not_reused_silently(tmp_path, capsys):
    # A second run in the same --out (the first stopped before its checkpoint) with another --train-size trained
    # on the first run's data without a word; a resume with one kept the old data and did not say so.
    (tmp_path / "data.partial" / "train").mkdir(parents=True)    # left by an interrupted write: made anew
    assert run(tmp_path, "--steps", "1") == 0
    assert not (tmp_path / "data.partial").exists()
    made = json.loads((tmp_path / "data" / "synthetic.json").read_text())
    assert made["train_size"] == 4 and made["size"] == [16, 32]
    assert len(list((tmp_path / "data" / "train" / "image").glob("*.npy"))) == 4
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit, match=r"made with --train-size 4 \(now 6\); delete .*data"):
        train.main(["cityscapes", "--out", str(tmp_path), "--size", "16", "32", *TINY, "--train-size", "6",
                    "--steps", "1"])
    assert run(tmp_path / "again", "--steps", "1") == 0
    capsys.readouterr()
    assert train.main(["cityscapes", "--out", str(tmp_path / "again"), "--size", "16", "32", *TINY,
                       "--train-size", "6", "--steps", "2", "--resume"]) == 0
    assert "train_size: 4 -> 6 (the synthetic data made at the start stays)" in capsys.readouterr().err
    assert len(list((tmp_path / "again" / "data" / "train" / "image").glob("*.npy"))) == 4
