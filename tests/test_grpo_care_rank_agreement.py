"""Flags that decide whether a step raises are agreed over the ranks (grpo_care.distributed.max_over_ranks), so a
non-finite loss or reference on one rank stops every rank with the same error instead of leaving the others
waiting in backward's collectives. Two CPU processes over gloo."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    from grpo_care import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = distributed.DistEnv(rank=rank, world_size=2, mode="ddp")
        own = torch.tensor([1.0, 0.0]) if rank == 1 else torch.tensor([0.0, 0.0])  # rank 1 alone saw a NaN
        results[rank] = distributed.max_over_ranks(own, env).tolist()
        assert own.tolist() == ([1.0, 0.0] if rank == 1 else [0.0, 0.0])  # the input is left as it was
    finally:
        dist.destroy_process_group()


def test_a_flag_raised_on_one_rank_reaches_every_rank():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
        assert dict(results) == {0: [1.0, 0.0], 1: [1.0, 0.0]}


def test_one_process_returns_its_own_values():
    from grpo_care import distributed

    values = torch.tensor([0.0, 1.0])
    assert distributed.max_over_ranks(values, distributed.DistEnv()) is values
