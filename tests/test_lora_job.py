"""The LoRA adapters Ray job on tiny-random: Ray Train local mode (num_workers=0), resumable cache,
index, registry publishing; plus the report-round bookkeeping that keeps ray.train.report balanced."""

from __future__ import annotations

import json

import pytest

from train_jobs import lora_adapters as job


def test_shards_are_disjoint_and_reports_balanced():
    ids = list(range(7))
    shards = [job.shard(ids, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == ids and len(set(sum(shards, []))) == 7
    # every rank reports the same number of rounds, even with unequal shards
    rounds = job.report_rounds(len(ids), 3, report_every=2)
    assert rounds == 2 and all(len(s) <= rounds * 2 for s in shards)
    assert job.report_rounds(0, 2, 5) == 1


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        job.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--num-adapters", "--workers", "--out", "--publish", "--store", "--rank", "--layers",
                 "--modules", "--steps", "--lr", "--batch-size", "--report-every", "--tenant-mode"):
        assert flag in text


@pytest.mark.ray
def test_job_local_mode_trains_indexes_publishes_and_resumes(tiny_model, tmp_path):
    from peft import PeftModel

    from cluster.models import load_model
    from cluster.registry import Registry
    from compression.codebook.tasks import LoraTask, evaluate

    out, store = tmp_path / "adapters", tmp_path / "store"
    argv = ["--model", "tiny-random", "--num-adapters", "3", "--workers", "0", "--out", str(out),
            "--steps", "4", "--layers", "2", "--rank", "4", "--report-every", "2",
            "--publish", "--store", str(store)]
    index = job.main(argv)

    rows = index["adapters"]
    assert [r["task_id"] for r in rows] == [0, 1, 2] and index["summary"]["adapters"] == 3
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["adapters"] == rows and on_disk["model"]["id"] == "tiny-random"
    for r in rows:
        assert {"task_id", "description", "base_accuracy", "accuracy", "train_seconds"} <= set(r)
        d = out / r["path"]
        assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "task.json"]
    # task.json reproduces the task; the PEFT dir loads and evaluates to the recorded accuracy
    rec = json.loads((out / rows[0]["path"] / "task.json").read_text())
    task = LoraTask.model_validate(rec["task"])
    model, tok = load_model(tiny_model)
    peft_model = PeftModel.from_pretrained(model, str(out / rows[0]["path"]))
    assert evaluate(peft_model, tok, task) == pytest.approx(rec["metrics"]["accuracy"], abs=1e-6)

    reg = Registry(str(store))
    for r in rows:
        manifest = reg.resolve(r["tenant"], "adapter", r["name"])
        assert manifest.version == 1 and manifest.metadata["task_id"] == r["task_id"]
        assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    # resumable: a second run skips every adapter and does not publish new versions
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")}
    index2 = job.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")} == mtimes
    assert index2["run"]["rank0"]["skipped"] == 3 and index2["run"]["rank0"]["trained"] == 0
    assert all(reg.versions(r["tenant"], "adapter", r["name"]) == [1] for r in rows)
