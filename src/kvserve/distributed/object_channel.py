"""Python objects (step contracts, results) between the engine process and its workers, on a gloo group.

The channel is a process group of its own (`ProcessGroupGloo` on a file store), not the default one:
the engine process joins only this group, the workers also form their own world for the model's
collectives, and several engines (data-parallel replicas, or tests) can live in one process. An
object travels pickled in a uint8 tensor, its length first. Gloo notices a peer that died (the
connection closes), so a wait on a dead worker raises at once instead of hanging.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Workers wait for the next step for as long as the server idles; a dead peer still ends a wait at once.
_IDLE_TIMEOUT = timedelta(days=365)


class ObjectChannel:
    def __init__(self, store_path: str, rank: int, world_size: int) -> None:
        store = dist.FileStore(store_path, world_size)
        self.group = dist.ProcessGroupGloo(store, rank, world_size, _IDLE_TIMEOUT)
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, obj: Any = None, root: int = 0) -> Any:
        """`obj` from `root` to every member; every member gets it back."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        size = torch.zeros(1, dtype=torch.int64)
        payload = None
        if self.rank == root:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            size[0] = payload.numel()
        self.group.broadcast([size], opts).wait()
        if self.rank != root:
            payload = torch.empty(int(size[0]), dtype=torch.uint8)
        self.group.broadcast([payload], opts).wait()
        return obj if self.rank == root else pickle.loads(payload.numpy().tobytes())

    def send(self, obj: Any, dst: int) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        self.group.send([torch.tensor([payload.numel()], dtype=torch.int64)], dst, 0).wait()
        self.group.send([payload], dst, 1).wait()

    def recv(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self.group.recv([size], src, 0).wait()
        payload = torch.empty(int(size[0]), dtype=torch.uint8)
        self.group.recv([payload], src, 1).wait()
        return pickle.loads(payload.numpy().tobytes())
