"""Crash safety and concurrent publishing, with real processes on a real directory."""

import json
import signal
import subprocess
import sys
import textwrap
import time

from cluster.registry import Registry

WRITER = textwrap.dedent("""
    import sys, time, torch
    from safetensors.torch import save
    from cluster.registry import Registry
    reg = Registry(sys.argv[1])
    mode = sys.argv[2]
    def files(value, n=16):
        return {"connectors.json": b'{"v": %d}' % value,
                "connectors.safetensors": save({"w": torch.full((n, 1024), float(value))})}
    if mode == "pause-before-manifest":
        def progress(msg):
            print(msg, flush=True)
            if msg == "data written":
                time.sleep(60)  # the parent kills us here: data on disk, no manifest yet
        reg.publish("acme", "connectors", "c", files(2), on_progress=progress)
    elif mode == "big":
        print("start", flush=True)
        reg.publish("acme", "connectors", "c", files(3, n=60_000))  # ~245 MB: killed while writing
    else:
        for i in range(int(sys.argv[3])):
            reg.publish("acme", "connectors", "c", files(int(mode) * 1000 + i))
""")


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)], stdout=subprocess.PIPE, text=True)


def _setup(tmp_path) -> tuple[Registry, str]:
    uri = str(tmp_path / "store")
    reg = Registry(uri)
    reg.create_tenant("acme")
    proc = _spawn(uri, 1, 1)
    assert proc.wait(300) == 0
    return reg, uri


def _assert_v1_intact(reg: Registry) -> None:
    assert reg.versions("acme", "connectors", "c") == [1]
    manifest = reg.resolve("acme", "connectors", "c")
    assert json.loads(reg.read_file(manifest, "connectors.json")) == {"v": 1000}
    reg.read_file(manifest, "connectors.safetensors")  # checksum verified


def test_writer_killed_after_data_before_manifest_leaves_previous_version(tmp_path):
    reg, uri = _setup(tmp_path)
    proc = _spawn(uri, "pause-before-manifest")
    for line in proc.stdout:
        if line.strip() == "data written":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _assert_v1_intact(reg)
    assert len(reg.orphan_blobs("acme", "connectors", "c")) == 1
    # the store stays usable: the next publish gets version 2
    proc = _spawn(uri, 5, 1)
    assert proc.wait(300) == 0 and reg.versions("acme", "connectors", "c") == [1, 2]


def test_writer_killed_mid_file_write_leaves_previous_version(tmp_path):
    reg, uri = _setup(tmp_path)
    proc = _spawn(uri, "big")
    assert proc.stdout.readline().strip() == "start"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _assert_v1_intact(reg)


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    uri = str(tmp_path / "store")
    reg = Registry(uri)
    reg.create_tenant("acme")
    writers, per_writer = 4, 5
    procs = [_spawn(uri, w + 1, per_writer) for w in range(writers)]
    assert all(p.wait(300) == 0 for p in procs)
    versions = reg.versions("acme", "connectors", "c")
    assert versions == list(range(1, writers * per_writer + 1))
    seen = set()
    for v in versions:
        manifest = reg.resolve("acme", "connectors", "c", v)
        value = json.loads(reg.read_file(manifest, "connectors.json"))["v"]
        reg.read_file(manifest, "connectors.safetensors")
        seen.add(value)
    assert seen == {w * 1000 + i for w in range(1, writers + 1) for i in range(per_writer)}
    assert reg.orphan_blobs("acme", "connectors", "c") == []
