"""The router's per-tenant in-flight cap (``tenant_max_in_flight``): a tenant alone is never held back;
while another tenant is active, its requests past the cap wait at the router in arrival order and the
other tenant passes at once; when the other goes idle the waiters go on; a wait past the deadline is a
503 naming the knob; a slot is given back exactly once."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.ingress.openai_api import OpenAIError
from serve_app.ingress.state import TenantGate


async def _entered_within(gate: TenantGate, tenant: str, seconds: float):
    return await asyncio.wait_for(gate.enter(tenant), seconds)


def test_a_tenant_alone_is_never_held_back():
    async def scenario() -> None:
        gate = TenantGate(2, wait_s=5.0, active_s=10.0)
        for _ in range(20):
            await _entered_within(gate, "a", 0.5)

    asyncio.run(scenario())


def test_past_its_cap_a_tenant_waits_in_order_while_another_passes():
    async def scenario() -> list[str]:
        gate, order = TenantGate(2, wait_s=5.0, active_s=10.0), []
        b0 = await gate.enter("b")  # B is active
        a1, a2 = await gate.enter("a"), await gate.enter("a")

        async def later(tenant: str, tag: str, hold: bool) -> None:
            release = await gate.enter(tenant)
            order.append(tag)
            if not hold:
                release()

        waiting = [asyncio.create_task(later("a", f"a{i}", hold=True)) for i in (3, 4)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(later("b", "b1", hold=False), 1.0)  # B is not behind A's cap
        assert order == ["b1"]  # A's third and fourth still wait
        a1()
        a1()  # a second release of the same slot gives nothing back: a4 still waits
        await asyncio.sleep(0.05)
        assert order == ["b1", "a3"]
        a2()
        await asyncio.wait_for(asyncio.gather(*waiting), 1.0)
        b0()
        return order

    assert asyncio.run(scenario()) == ["b1", "a3", "a4"]


def test_waiters_go_on_once_the_other_tenant_is_idle():
    async def scenario() -> None:
        gate = TenantGate(1, wait_s=5.0, active_s=0.2)
        b = await gate.enter("b")
        await gate.enter("a")
        blocked = asyncio.create_task(gate.enter("a"))
        await asyncio.sleep(0.1)
        assert not blocked.done()
        b()  # B leaves; 0.2 s later it no longer counts as active
        await asyncio.wait_for(blocked, 1.0)

    asyncio.run(scenario())


def test_a_wait_past_the_deadline_is_a_503_naming_the_knob():
    async def scenario() -> None:
        gate = TenantGate(1, wait_s=0.05, active_s=10.0)
        await gate.enter("b")
        await gate.enter("a")
        await gate.enter("a")

    with pytest.raises(OpenAIError) as err:
        asyncio.run(scenario())
    assert err.value.status == 503 and "tenant_max_in_flight" in str(err.value.body())


def test_no_cap_never_waits():
    async def scenario() -> None:
        gate = TenantGate(0, wait_s=0.0)
        await gate.enter("b")
        for _ in range(100):
            await gate.enter("a")

    asyncio.run(scenario())
