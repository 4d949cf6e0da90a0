"""The one-page gate-analysis report: an HTML file with the figures embedded, plus summary.json."""
from __future__ import annotations

import base64
import html
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from . import plots
from .gates import LayerGates
from .measures import finite_gramians, gate_affinity, gradient_cosine, summary


def write_report(layers: Sequence[LayerGates], out_dir: str | os.PathLike, *, tau: float = 0.5, record=None,
                 task_names: Sequence[str] | None = None, title: str = "Gate analysis") -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finite = finite_gramians(record["gramians"]) if record is not None and len(record["gramians"]) else ()
    gramians = finite if len(finite) else None
    names = list(task_names) if task_names else None
    affinity = gate_affinity(layers, tau)
    figures = [
        ("Gates per layer (task × channel)", plots.gate_heatmaps(layers, out / "gates.png", names)),
        ("Capacity: shared, task-private and closed channels", plots.capacity_bars(layers, out / "capacity.png", tau)),
        ("Task affinity: cosine of gate vectors", plots.matrix(affinity["cosine"], out / "affinity_cosine.png",
                                                               "gate cosine", names, 0.0, 1.0)),
        ("Task affinity: overlap of open channels", plots.matrix(affinity["overlap"], out / "affinity_overlap.png",
                                                                 f"open-channel overlap (τ={tau})", names, 0.0, 1.0)),
    ]
    if gramians is not None:
        figures.append(("Gradient cosine similarity (mean over training)",
                        plots.matrix(gradient_cosine(gramians), out / "gradient_cosine.png", "gradient cosine",
                                     names)))
    if record is not None and record["trajectories"] and len(record["steps"]) > 1:
        figures.append(("Gate trajectories", plots.trajectories(record["steps"], record["trajectories"],
                                                                out / "trajectories.png", names)))
    data = summary(layers, tau, gramians)
    data["task_names"] = names
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "summary.json")
    sections = "".join(
        f"<h2>{html.escape(caption)}</h2><img src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}' style='max-width:100%'>" for caption, path in figures)
    cap_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['shared']:.2f}</td><td>{v['specialized']:.2f}</td>"
        f"<td>{v['closed']:.2f}</td><td>{', '.join(f'{x:.2f}' for x in v['open'])}</td></tr>"
        for name, v in data["layers"].items())
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><p>τ = {tau}; {layers[0].num_tasks} tasks; {len(layers)} layers; gates "
            f"are {html.escape(layers[0].kind)}.</p><table border=1 cellpadding=3><tr><th>layer</th><th>shared</th>"
            f"<th>task-private</th><th>closed</th><th>open per task</th></tr>{cap_rows}</table>{sections}"
            "</body></html>")
    tmp = out / "report.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, out / "report.html")
    return out / "report.html"


def mean_gate(layers: Sequence[LayerGates]) -> np.ndarray:
    return np.stack([layer.values.mean(axis=1) for layer in layers])
