"""Cross-process task statistics: 2 gloo ranks equal one process on the concatenated batch (forward, input and
parameter gradients, running statistics, num_batches_tracked)."""
from __future__ import annotations

import os

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
