"""A multi-tenant job reports every tenant that failed, after the others finished (train_jobs.fanout)."""

import concurrent.futures
from types import SimpleNamespace

import pytest

from train_jobs.fanout import TenantsFailed, each_completed


def _run(tenant: str) -> dict:
    if tenant.startswith("bad"):
        raise RuntimeError(f"worker of {tenant} died: no_such_proj")
    return {"tenant": tenant}


def test_every_failed_tenant_is_named_after_the_others_finish():
    jobs = [SimpleNamespace(tenant=t, name="survival") for t in ("acme", "bad1", "globex", "bad2")]
    done = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {pool.submit(_run, j.tenant): j for j in jobs}
        with pytest.raises(TenantsFailed) as info:
            for job, out in each_completed(futures, "experts"):
                done.append(job.tenant)
                assert out["tenant"] == job.tenant
    assert sorted(done) == ["acme", "globex"]  # the good ones were handed back (published) first
    message = str(info.value)
    assert message.startswith("2 of 4 experts runs failed")
    assert "bad1/survival: RuntimeError: worker of bad1 died" in message and "bad2/survival" in message


def test_all_good_raises_nothing():
    jobs = [SimpleNamespace(tenant=t, name="x") for t in ("a", "b")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {pool.submit(_run, j.tenant): j for j in jobs}
        assert sorted(out["tenant"] for _, out in each_completed(futures, "connectors")) == ["a", "b"]
