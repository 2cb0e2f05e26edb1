"""Dynamic batching: concurrent requests for one model are answered by one forward pass.

A request waits at most `max_wait_s` for company; a batch never holds more than `max_batch_size` inputs. Batches run
in one worker thread per base model, so the event loop stays free and a shared base never runs two adapters at once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Item:
    inputs: list
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list], list], executor: ThreadPoolExecutor, max_batch_size: int = 32,
                 max_wait_s: float = 0.005):
        self.run_batch = run_batch  # inputs -> one output per input, in order (called in the worker thread)
        self.executor = executor
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[_Item] | None = None
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_sizes: list[int] = []  # inputs per forward pass, for /metrics and tests

    async def submit(self, inputs: list) -> list:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # created lazily inside the running event loop (test clients may start several)
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._loop())
        fut = loop.create_future()
        await self.queue.put(_Item(list(inputs), fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            size = len(items[0].inputs)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_size:
                timeout = deadline - loop.time()
                try:
                    nxt = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if size + len(nxt.inputs) > self.max_batch_size:
                    await self._run(loop, items)  # nxt starts the next batch
                    items, size, deadline = [nxt], len(nxt.inputs), loop.time() + self.max_wait_s
                    continue
                items.append(nxt)
                size += len(nxt.inputs)
            await self._run(loop, items)

    async def _run(self, loop, items: list[_Item]) -> None:
        items = [it for it in items if not it.future.done()]  # a request that timed out meanwhile is not computed
        if not items:
            return
        flat = [x for it in items for x in it.inputs]
        self.batch_sizes.append(len(flat))
        try:
            outs = await loop.run_in_executor(self.executor, self.run_batch, flat)
        except Exception as e:  # the requests in this batch fail; the loop and the server go on
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        i = 0
        for it in items:
            if not it.future.done():
                it.future.set_result(outs[i : i + len(it.inputs)])
            i += len(it.inputs)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
