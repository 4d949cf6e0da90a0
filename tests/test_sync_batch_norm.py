"""Cross-process task statistics: 2 gloo ranks equal one process on the concatenated batch (forward, input and
parameter gradients, running statistics, num_batches_tracked)."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tsbn_kernels as tk
from tsbn_kernels.sync_batch_norm import convert_sync

T, C = 3, 4
IDS = [torch.tensor([0, 0, 2, 1, 2]), torch.tensor([2, 2, 0, 2, 0, 0])]   # task 1 only on rank 0


def inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    n = IDS[rank].numel()
    return (torch.randn(n, C, 3, 2, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randn(n, C, 3, 2, generator=g, dtype=torch.float64))


def make_layer():
    torch.manual_seed(0)
    layer = tk.TSBatchNorm2d(C, T, gate="sigmoid", bias=True, activation="relu", momentum=None).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layer = convert_sync(make_layer())
    x, grad = inputs(rank)
    x.requires_grad_(True)
    for _ in range(2):                                   # two steps: the cumulative average counts both
        y = layer(x, IDS[rank])
    (y * grad).sum().backward()
    torch.save({"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
                "state": layer.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    layer = make_layer()
    xs, grads = zip(*(inputs(r) for r in range(2)))
    x = torch.cat(xs).requires_grad_(True)
    ids = torch.cat(IDS)
    for _ in range(2):
        y = layer(x, ids)
    (y * torch.cat(grads)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], layer.weight.grad)   # what DDP's all-reduce sums
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], layer.bias.grad)
    for r in ranks:
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, msg=key)
    assert ranks[1]["state"]["num_batches_tracked"].tolist() == [2, 2, 2]            # task 1 counted on rank 1 too


# Each case: (name, layer kwargs, dtype, memory format, spatial shape, per-rank task ids or per-rank batch sizes for
# task-major blocks, mean offset). Ranks differ in batch size and in which tasks they hold.
CASES = {
    "fp32-channels_last-blocks-gate_none": (dict(gate="none", bias=True, momentum=0.1), torch.float32,
                                            torch.channels_last, (5, 3), (6, 9), 0.0),
    "fp32-large_mean-ragged": (dict(gate="sigmoid", bias=True, activation="relu", momentum=0.1), torch.float32,
                               torch.contiguous_format, (4, 7), IDS, 1e4),
    "bf16-ragged-no_affine": (dict(affine=False, momentum=None), torch.bfloat16, torch.contiguous_format, (3, 3),
                              IDS, 2.0),
    # rank 1 holds one value of tasks 0 and 1 (no error: the statistics span both ranks)
    "fp64-1d-ragged-relu": (dict(gate="sigmoid", bias=True, activation="relu", momentum=0.3), torch.float64, None,
                            (), [torch.tensor([1, 0, 2, 2, 0, 1, 1]), torch.tensor([0, 2, 2, 2, 1])], 1.0),
    "fp32-empty_rank": (dict(gate="sigmoid", bias=True, momentum=0.1), torch.float32, torch.contiguous_format,
                        (2, 5), [torch.tensor([0, 1, 2, 1, 0, 2]), torch.tensor([], dtype=torch.long)], 0.0),
}


def case_layer(case):
    kwargs, dtype, *_ = CASES[case]
    torch.manual_seed(3)
    cls = tk.TSBatchNorm1d if not CASES[case][3] else tk.TSBatchNorm2d
    layer = cls(C, T, **kwargs).to(dtype)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.normal_()
            if layer.bias is not None:
                layer.bias.normal_()
    return layer


def case_inputs(case, rank):
    _, dtype, memory_format, spatial, layout, offset = CASES[case]
    ids = layout[rank] if isinstance(layout[rank], torch.Tensor) else None
    n = ids.numel() if ids is not None else layout[rank]
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64) * 3 + offset
    grad = torch.randn(n, C, *spatial, generator=g, dtype=torch.float64)
    x, grad = x.to(dtype), grad.to(dtype)
    if memory_format is not None and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    return x, grad, ids


def backend_worker(rank, world, init_file, out_dir, backend):
    from tsbn_kernels import dispatch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {"ran": dispatch.resolve(backend, torch.device("cpu"), "ts_batch_norm_sync")[0]}
    for case in CASES:
        layer = convert_sync(case_layer(case))
        layer.backend = backend
        x, grad, ids = case_inputs(case, rank)
        x.requires_grad_(True)
        for _ in range(2):
            y = layer(x, ids)
        (y.double() * grad.double()).sum().backward()
        results[case] = {"y": y.detach(), "dx": x.grad,
                         "grads": {n: p.grad for n, p in layer.named_parameters()}, "state": layer.state_dict()}
    torch.save(results, os.path.join(out_dir, f"{backend}{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
def test_every_sync_backend_on_two_gloo_ranks_equals_one_process_on_the_concatenated_batch(tmp_path, backend):
    """The fused sync kernels of each backend (the eager one too), over cases that cover layouts, dtypes, ragged
    and absent tasks, a rank without samples, |mean| >> std, gates, relu and momentum=None; the truth is the eager
    reference in one process on the concatenated batch, in float64 from the same inputs."""
    if backend not in tk.available_backends("cpu", "ts_batch_norm_sync"):
        pytest.skip(f"no {backend} sync kernels on the CPU here (triton: TRITON_INTERPRET=1)")
    mp.spawn(backend_worker, args=(2, str(tmp_path / "init"), str(tmp_path), backend), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{backend}{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["ran"] == backend for r in ranks)
    for case in CASES:
        dtype = CASES[case][1]
        layer = case_layer(case).double()
        layer.backend = "eager"
        xs, grads, ids = zip(*(case_inputs(case, r) for r in range(2)))
        x = torch.cat([t.double() for t in xs]).requires_grad_(True)
        task_ids = None if ids[0] is None else torch.cat(ids)
        if task_ids is None:        # task-major blocks on each rank: the concatenation is per-sample ids
            task_ids = torch.cat([torch.arange(t.shape[0]) // (t.shape[0] // T) for t in xs])
        for _ in range(2):
            y = layer(x, task_ids)
        (y * torch.cat(grads).double()).sum().backward()
        got = [r[case] for r in ranks]
        tol = {} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 \
            else dict(rtol=1e-4, atol=max(1e-4, 2 * CASES[case][5] * torch.finfo(torch.float32).eps / 3))
        # (fp32: x − mean at |mean| = 1e4 loses ulps of 1e4, which the std of 3 scales up)
        def close(got_value, want, what, **scaled):
            torch.testing.assert_close(got_value.to(want.dtype), want, **{**tol, **scaled},
                                       msg=lambda m: f"{case}, {what}: {m}")

        close(torch.cat([g["y"] for g in got]), y.detach(), "y")
        close(torch.cat([g["dx"] for g in got]), x.grad, "dx")
        for name, p in layer.named_parameters():      # each rank's own gradient; DDP's all-reduce sums them
            # sums over each task's ~100 values of terms with the errors of y
            close(sum(g["grads"][name] for g in got), p.grad, name, **({"atol": 10 * tol["atol"]} if tol else {}))
        for g in got:
            for key, value in layer.state_dict().items():
                close(g["state"][key], value, key)


def test_sync_is_ignored_without_a_process_group():
    layer = convert_sync(make_layer())
    plain = make_layer()
    x, _ = inputs(0)
    torch.testing.assert_close(layer(x, IDS[0]), plain(x, IDS[0]))


def make_plain(momentum):
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def plain_worker(rank, world, init_file, out_dir, momentum):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = convert_sync(torch.nn.Sequential(make_plain(momentum)))
    assert type(model[0]).__name__ == "DistributedBatchNorm"
    x, grad = inputs(rank)
    x.requires_grad_(True)
    for _ in range(2):
        y = model(x)
    (y * grad).sum().backward()
    torch.save({"y": y.detach(), "dx": x.grad, "dw": model[0].weight.grad, "db": model[0].bias.grad,
                "state": model[0].state_dict()}, os.path.join(out_dir, f"plain{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_plain_batch_norm_synchronised_on_gloo_equals_the_concatenated_batch(tmp_path, momentum):
    mp.spawn(plain_worker, args=(2, str(tmp_path / "init"), str(tmp_path), momentum), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"plain{r}.pt", weights_only=True) for r in range(2)]
    bn = make_plain(momentum)
    xs, grads = zip(*(inputs(r) for r in range(2)))
    x = torch.cat(xs).requires_grad_(True)
    for _ in range(2):
        y = bn(x)
    (y * torch.cat(grads)).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad)
    for r in ranks:
        assert r["state"].keys() == bn.state_dict().keys()
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, msg=key)


def test_converted_plain_batch_norm_is_batch_norm_in_one_process():
    bn = make_plain(0.1)
    converted = convert_sync(make_plain(0.1))
    x, _ = inputs(1)
    torch.testing.assert_close(converted(x), bn(x))
    torch.testing.assert_close(converted.running_var, bn.running_var)
    assert converted.weight.dtype == torch.float64


def compile_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = convert_sync(torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), tk.TSBatchNorm2d(C, 2, activation="relu")))
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(rank)) + rank
    eager = net(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net)(x)
    compiled.square().sum().backward()
    torch.save({"y": (compiled.detach(), eager.detach()), "grads": ([p.grad for p in net.parameters()], want)},
               os.path.join(out_dir, f"compiled{rank}.pt"))
    dist.destroy_process_group()


def test_a_compiled_model_in_sync_mode_equals_the_eager_one(tmp_path):
    """torch.compile around the sync path (its collectives break the graph there) computes what eager does."""
    mp.spawn(compile_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"compiled{rank}.pt", weights_only=True)
        torch.testing.assert_close(*saved["y"])
        for got, want in zip(*saved["grads"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def double_backward_worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layer = convert_sync(make_layer())
    layer.backend = backend
    x, _ = inputs(rank)
    x.requires_grad_(True)
    y = layer(x, IDS[rank])
    try:
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
        outcome = "no error"
    except RuntimeError as exc:
        outcome = str(exc)
    (pathlib.Path(out_dir) / f"double{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_sync_mode_refuses_a_second_derivative(tmp_path, backend):
    """Its collectives are not recorded by autograd: create_graph=True would silently drop the cross-process terms
    of a gradient penalty or a Hessian-vector product."""
    mp.spawn(double_backward_worker, args=(2, str(tmp_path / "init"), str(tmp_path), backend), nprocs=2, join=True)
    for rank in range(2):
        assert "does not support higher-order gradients" in (tmp_path / f"double{rank}.txt").read_text()
