"""tsbn-analyze: the gate report of a tsbn-train run directory, a checkpoint file, or a saved state_dict.

    tsbn-analyze RUN_DIR | CHECKPOINT.pt [--tau 0.5] [--out DIR] [--gate sigmoid|none]

A run directory holds config.json (benchmark, norm, num_tasks, task_names), checkpoint.pt ({"model":
state_dict, ...}) and, when training recorded it, analysis/record.npz (gate trajectories and Gramians).
The report goes to RUN_DIR/analysis/ (or next to the checkpoint, or --out). A checkpoint file of tsbn-train
carries the run's config, which then serves as config.json does.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

from .gates import gates_from_state_dict
from .record import load_record
from .report import write_report


def _load_state(path: pathlib.Path) -> tuple[dict, dict]:
    """(state_dict, the run config the checkpoint carries or {})"""
    if not path.exists():
        raise SystemExit(f"tsbn-analyze: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report which file is unreadable and why
        raise SystemExit(f"tsbn-analyze: cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        config = obj.get("config")
        return obj["model"], config if isinstance(config, dict) else {}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise SystemExit(f"tsbn-analyze: {path} holds neither a state_dict nor a dict with a 'model' state_dict")


def _load_run_record(run_dir: pathlib.Path) -> dict | None:
    record_path = run_dir / "analysis" / "record.npz"
    if not record_path.exists():
        return None
    try:
        return load_record(record_path)
    except Exception as exc:  # noqa: BLE001 - np.load raises anything from ValueError to BadZipFile
        raise SystemExit(f"tsbn-analyze: cannot read the training record {record_path}: {exc}; move it "
                         "away to analyse the checkpoint alone") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsbn-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=pathlib.Path)
    parser.add_argument("--tau", type=float, default=0.5, help="a channel is open for a task when its gate > tau")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--gate", choices=("sigmoid", "none"), help="override the gate kind of config.json")
    args = parser.parse_args(argv)
    record = None
    if args.path.is_dir():
        if not (args.path / "checkpoint.pt").exists():
            raise SystemExit(f"tsbn-analyze: {args.path} is not a tsbn-train run directory: it holds no "
                             "checkpoint.pt")
        config_path = args.path / "config.json"
        state, config = _load_state(args.path / "checkpoint.pt")
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"tsbn-analyze: cannot read {config_path}: {exc}") from None
        record = _load_run_record(args.path)
        out = args.out or args.path / "analysis"
    else:
        # Without the run's norm and num_tasks, a TSBN (gate="none") checkpoint would be read as sigmoid gates
        # and the TS layer norms of a ViT (no buffers) would not be found.
        state, config = _load_state(args.path)
        if args.path.name == "checkpoint.pt":     # a run's own checkpoint: its training record is beside it
            record = _load_run_record(args.path.parent)
        out = args.out or args.path.parent / f"{args.path.stem}_analysis"
    if config.get("norm") == "bn":
        raise SystemExit(f"tsbn-analyze: {args.path} was trained with --norm bn (hard sharing): it has no "
                         "task-specific gates to analyse")
    gate = args.gate or ("none" if config.get("norm") == "tsbn" else "sigmoid")
    try:
        layers = gates_from_state_dict(state, gate=gate, num_tasks=config.get("num_tasks"))
    except ValueError as exc:
        raise SystemExit(f"tsbn-analyze: {args.path}: {exc}") from None
    try:
        report = write_report(layers, out, tau=args.tau, record=record, task_names=config.get("task_names"),
                              title=f"Gate analysis: {args.path}")
    except OSError as exc:
        raise SystemExit(f"tsbn-analyze: cannot write the report to {out}: {exc}") from None
    print(f"{len(layers)} gated layers, {layers[0].num_tasks} tasks -> {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
