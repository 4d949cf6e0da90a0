"""Gate analysis: capacity allocation, filter specialization and task relationships (tsbn-analyze)."""
from __future__ import annotations

from .gates import LayerGates, gates_from_module, gates_from_state_dict
from .measures import capacity, gate_affinity, gradient_cosine, summary
from .record import TrainingRecorder, load_record
from .report import write_report


def main(argv: list[str] | None = None) -> int:
    """tsbn-analyze (``analysis.cli.main``). Imported when called, so that the package does not load the cli
    module: ``python -m tsbn_kernels.analysis.cli`` then runs it without runpy's warning of a module imported
    twice."""
    from .cli import main as cli_main

    return cli_main(argv)


__all__ = ["LayerGates", "TrainingRecorder", "capacity", "gate_affinity", "gates_from_module",
           "gates_from_state_dict", "gradient_cosine", "load_record", "main", "summary", "write_report"]
