"""Gate analysis: capacity allocation, filter specialization and task relationships (tsbn-analyze)."""
from __future__ import annotations

from .cli import main
from .gates import LayerGates, gates_from_module, gates_from_state_dict
from .measures import capacity, gate_affinity, gradient_cosine, summary
from .record import TrainingRecorder, load_record
from .report import write_report

__all__ = ["LayerGates", "TrainingRecorder", "capacity", "gate_affinity", "gates_from_module",
           "gates_from_state_dict", "gradient_cosine", "load_record", "main", "summary", "write_report"]
