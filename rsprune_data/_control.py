"""A small JSON state in shared memory that DataLoader workers read (epoch, config, resume point)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .errors import ConfigError


class _Control:
    """A JSON dict in shared memory, written by the main process, read by every worker.

    Layout of the uint8 tensor: int64 sequence number (odd while a write is in progress), int64
    payload length, payload. torch pickles a shared tensor by handle, so workers started by fork or
    spawn all map the same bytes (a ``multiprocessing.Value`` would also need a lock and a fixed
    type; this holds the config dict as is).
    """

    SIZE = 1 << 16

    def __init__(self, payload: dict[str, Any]) -> None:
        import torch

        self._buf = torch.zeros(self.SIZE, dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
        self.write(payload)

    def write(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        if len(data) > self.SIZE - 16:
            raise ConfigError(f"dataset state of {len(data)} bytes exceeds {self.SIZE - 16} bytes")
        view = self._buf.numpy()
        head = view[:16].view(np.int64)
        head[0] += 1
        view[16 : 16 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        head[1] = len(data)
        head[0] += 1

    def read(self) -> dict[str, Any]:
        view = self._buf.numpy()
        head = view[:16].view(np.int64)
        while True:
            seq = int(head[0])
            if seq % 2:
                os.sched_yield()
                continue
            data = view[16 : 16 + int(head[1])].tobytes()
            if int(head[0]) == seq:
                return json.loads(data)  # type: ignore[no-any-return]

    def update(self, **changes: Any) -> dict[str, Any]:
        payload = {**self.read(), **changes}
        payload["gen"] += 1
        self.write(payload)
        return payload

    def __deepcopy__(self, memo: dict[int, Any]) -> _Control:
        return _Control(self.read())  # a deep copy gets its own shared memory
