"""Python objects (step contracts, results) between the engine process and its workers, on a gloo group.

The channel is a process group of its own (`ProcessGroupGloo` on a file store), not the default one:
the engine process joins only this group, the workers also form their own world for the model's
collectives, and several engines (data-parallel replicas, or tests) can live in one process. An
object travels pickled in a uint8 tensor, its length first (tags 0 and 1 keep the two in order).

Messages are point-to-point and sends do not wait: a gloo send completes only once the peer posts
the matching receive, and a pipeline keeps several steps in flight, so the engine must be able to
send the next step to a stage that is still busy, and a worker its reply to an engine that is
still sending (a collective broadcast would make each wait for the other). `send` returns a
`PendingSend` that holds the buffers until the peer has them. Gloo notices a peer that died (the
connection closes), so a wait on a dead peer raises at once instead of hanging.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Workers wait for the next step for as long as the server idles; a dead peer still ends a wait at once.
_IDLE_TIMEOUT = timedelta(days=365)
_SIZE_TAG, _PAYLOAD_TAG = 0, 1


class PendingSend:
    """A send in progress: its buffers stay alive until `wait()` returns."""

    def __init__(self, works: list[Any], buffers: list[torch.Tensor]) -> None:
        self.works = works
        self.buffers = buffers

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.buffers = []


class ObjectChannel:
    def __init__(self, store_path: str, rank: int, world_size: int) -> None:
        store = dist.FileStore(store_path, world_size)
        self.group = dist.ProcessGroupGloo(store, rank, world_size, _IDLE_TIMEOUT)
        self.rank = rank
        self.world_size = world_size

    def send(self, obj: Any, dst: int) -> PendingSend:
        """Start sending `obj` to `dst`; returns at once."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        works = [self.group.send([size], dst, _SIZE_TAG), self.group.send([payload], dst, _PAYLOAD_TAG)]
        return PendingSend(works, [size, payload])

    def recv(self, src: int) -> Any:
        """The next object `src` sent (blocks until it arrives)."""
        size = torch.zeros(1, dtype=torch.int64)
        self.group.recv([size], src, _SIZE_TAG).wait()
        payload = torch.empty(int(size[0]), dtype=torch.uint8)
        self.group.recv([payload], src, _PAYLOAD_TAG).wait()
        return pickle.loads(payload.numpy().tobytes())
