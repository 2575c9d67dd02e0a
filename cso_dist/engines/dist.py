"""Process-group plumbing: who am I (torchrun, the deepspeed launcher, or srun), joining the group,
and the few collectives the trainer needs. Plain torch.distributed; nothing else.

Data preparation (tokenising, laying out the trie) happens in every rank *before* it joins the
process group, so a long preparation never runs into a collective's timeout; the group itself is
created with `dist.timeout_minutes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td

from cso_dist.util.errors import CsoError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"  # where rank 0's store listens (several ranks)
    master_port: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # node[01-04] -> node01 without scontrol
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def world_from_env(env: dict | None = None) -> World:
    """RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR/MASTER_PORT (torchrun, deepspeed launcher), else
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun one task per GPU) with the job's first node and a port derived
    from the job id. A single process is World(0, 1, 0). The environment is read, never written."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            w = World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            w = World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
            nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
            addr = env.get("MASTER_ADDR") or _first_host(nodes)
            port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
            return _checked(dataclasses.replace(w, master_addr=addr, master_port=int(port)), env)
        else:
            return World()
        if w.distributed:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
            if missing:
                raise CsoError(
                    f"distributed environment: WORLD_SIZE={w.world_size} but {', '.join(missing)} is not set "
                    "(launch with torchrun, deepspeed or srun)"
                )
            w = dataclasses.replace(w, master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))
    except ValueError as e:
        raise CsoError(f"distributed environment: a rank variable is not an integer ({e})") from None
    return _checked(w, env)


def _checked(w: World, env) -> World:
    if not 0 <= w.rank < w.world_size:
        raise CsoError(f"distributed environment: rank {w.rank} is not in [0, {w.world_size})")
    return w


def launcher_env(world: World) -> dict[str, str]:
    """The variables a library that reads its rank from the environment expects (DeepSpeed: RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as this world has them (one process: a port nothing listens on, its
    group's store lives in the process). The engine that needs them sets them."""
    port = world.master_port
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return {
        "RANK": str(world.rank),
        "WORLD_SIZE": str(world.world_size),
        "LOCAL_RANK": str(world.local_rank),
        "MASTER_ADDR": world.master_addr,
        "MASTER_PORT": str(port),
    }


def init(world: World, timeout_minutes: int) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU); a no-op for one process."""
    if not world.distributed or td.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    td.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"tcp://{world.master_addr}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def init_single() -> None:
    """A one-rank group (DeepSpeed and a device mesh need one even for a single process). Its store lives in this
    process: a TCP port picked as free could be taken by another process before the group listens on it."""
    if td.is_initialized():
        return
    td.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=td.HashStore(), rank=0, world_size=1)


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def all_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not td.is_initialized():
        return [obj]
    parts: list = [None] * td.get_world_size()
    td.all_gather_object(parts, obj)
    return parts


def sum_dicts(d: dict) -> dict:
    """Key-wise sum of a dict of numbers over all ranks (the union of keys)."""
    out: dict = {}
    for p in all_objects(d):
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def any_true(flag: bool) -> bool:
    """True on every rank when it is true on any rank."""
    if not td.is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device="cuda" if td.get_backend() == "nccl" else "cpu")
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def on_main(world: World, fn) -> None:
    """fn() on rank 0 (a claim or a check the job makes once); when it fails with a CsoError every rank stops with
    an error instead of waiting for rank 0 at the next collective."""
    err = None
    if world.main:
        try:
            fn()
        except CsoError as e:
            err = e
    if any_true(err is not None):
        raise err or CsoError("stopped: rank 0 failed (its error is in its log)")


def max_over_ranks(values: list[int]) -> list[int]:
    """Element-wise maximum of a list of integers over all ranks (the list itself for one process)."""
    if not td.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device="cuda" if td.get_backend() == "nccl" else "cpu")
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return t.tolist()


def my_share(items: list, world: World) -> list[tuple[object, float]]:
    """This rank's items of a step, round-robin, padded so every rank runs the same number of forwards
    (ZeRO-3 gathers parameters collectively; DDP all-reduces on the last backward). A padding item is
    (items[0], 0.0): run, but weighted zero."""
    mine = [(x, 1.0) for x in items[world.rank :: world.world_size]]
    per_rank = -(-len(items) // world.world_size) if items else 0
    while len(mine) < per_rank:
        mine.append((items[0], 0.0))
    return mine


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


@contextlib.contextmanager
def joined(world: World, timeout_minutes: int) -> Iterator[None]:
    """The process group for the length of a command: joined on entry (nothing for one process) and shut down on
    exit however the command ends, with the one-rank group an engine made for itself (init_single)."""
    init(world, timeout_minutes)
    try:
        yield
    finally:
        shutdown()
