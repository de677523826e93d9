"""BASELINE ONLY: the naive multi-adapter server — peft, one adapter active at a time.

Every adapter is loaded into one ``PeftModel`` up front (load time reported apart, not measured);
requests are served in groups: the adapter of the oldest waiting request is activated with
``set_adapter`` and every waiting request for that adapter (up to ``max_batch_size``) runs as one
static wave (the same wave loop as :mod:`bench.static_waves`). Requests for other adapters wait
for the next group. This is what a plain transformers + peft deployment does (Ray Serve's
multiplexing notes describe the same pattern). Not used by the service.
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext

from bench.static_waves import StaticWaveEngine, _Row
from serve_app.replica.engine_api import EngineCapabilities
from serve_app.replica.modifiers import ADAPTER


class PeftServer(StaticWaveEngine):
    """``StaticWaveEngine`` whose waves hold one adapter each, activated by ``set_adapter``."""

    def __init__(self, peft_model, tokenizer, max_batch_size: int = 8, threads: int = 1):
        super().__init__(peft_model, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=0, threads=threads)
        self.capabilities = EngineCapabilities(name="peft-one-adapter-at-a-time", modifiers=frozenset({ADAPTER}),
                                               continuous_batching=False, max_batch_rows=max_batch_size)
        self._stats.engine = "peft"
        self.switches = 0

    def adapter_names(self) -> list[str]:
        return list(self.model.peft_config)

    async def _wave_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backlog: list[_Row] = []
        while True:
            if not backlog:
                backlog.append(await self._pending.get())
            while not self._pending.empty():
                backlog.append(self._pending.get_nowait())
            adapter = backlog[0].adapter
            group = [r for r in backlog if r.adapter == adapter][: self.max_batch_size]
            backlog = [r for r in backlog if r not in group]
            await loop.run_in_executor(self._executor, self._run_wave_safely, group)

    def _adapter_context(self, adapters: list[str | None]):
        name = adapters[0]
        if name is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self.switches += 1
        return nullcontext()
