"""python -m tsbn_kernels.analysis: the same as tsbn-analyze."""
from .cli import main

raise SystemExit(main())
