"""A user adopting the package in an existing multi-task model: regressions found by exercising conversion,
checkpoints, per-sample task ids and the layers on every backend, each checked against tsbn_kernels.reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn  # noqa: F401  (used by later tests)

import tsbn_kernels as tk
from conftest import make_input, tolerance
from tsbn_kernels import reference

BACKENDS = tk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_buffer_refilled_through_numpy_is_checked_again(backend):
    # A loader that refills one numpy buffer per batch, shared with a tensor by torch.from_numpy: the writes do not
    # bump the tensor's version, so the checked-ids cache must not trust the last batch's counts.
    torch.manual_seed(0)
    bn = tk.TSBatchNorm1d(3, 3, backend=backend, track_running_stats=False)
    buffer = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    ids = torch.from_numpy(buffer)
    bn(make_input((6, 3), offset=10.0), task_ids=ids)
    buffer[2] = 7                                    # out of range now: must not reach the kernel
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        bn(make_input((6, 3)), task_ids=ids)
    buffer[:] = [0, 0, 1, 1, 1, 0]                   # valid, task 2 absent: must not be refused with stale counts
    x = make_input((6, 3), offset=10.0)
    want = reference.ts_batch_norm(x, bn.weight, None, task_ids=ids, num_tasks=3)
    torch.testing.assert_close(bn(x, task_ids=ids), want, **tolerance(torch.float32))
    buffer[:] = [0, 1, 1, 1, 2, 2]                   # task 0 has a single value per channel now
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x, task_ids=ids)
