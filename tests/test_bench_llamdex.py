"""bench.llamdex_accuracy's report: target verdicts and merging per-process runs into one table."""

from __future__ import annotations

import json

from bench import llamdex_accuracy as bench


def _result(name: str, llamdex: float, bound: float, base: float, api: float, llamdex_on_api_rows: float | None = None
            ) -> dict:
    rows = {"base LLM": {"accuracy": base}, "Llamdex, non-DP expert": {"accuracy": llamdex},
            "non-DP expert on true features": {"accuracy": bound},
            "Expert-API (guided), non-DP expert": {"accuracy": api, "rows": 4, "llamdex_non_dp_same_rows":
                                                   llamdex if llamdex_on_api_rows is None else llamdex_on_api_rows}}
    return {"dataset": name, "test_rows": 10, "test_split_rows": 20, "rows": rows,
            "fidelity": {"age": {"mae": 1.5, "mae_baseline": 3.0, "range": 100.0},
                         "sex": {"accuracy": 0.9, "accuracy_baseline": 0.6}},
            "connectors_training": {"seconds": {"cache": 10.0, "encoder": 5.0}}}


def test_verdicts_apply_each_datasets_tolerance():
    tol = {"titanic": 3, "wine": 5}
    lines = bench.verdicts([_result("titanic", 0.76, 0.80, 0.6, 0.4), _result("wine", 0.52, 0.56, 0.5, 0.53)], tol)
    assert "gap 4.0 pts (target ≤ 3: MISSED)" in lines[0] and lines[0].endswith(": yes")
    assert "gap 4.0 pts (target ≤ 5: met)" in lines[1] and lines[1].endswith(": NO")  # below Expert-API


def test_expert_api_is_compared_on_its_own_rows():
    """Expert-API runs on a subset: Llamdex must beat it on those rows, whatever its overall accuracy."""
    tol = {"bank": 5}
    worse_there = bench.verdicts([_result("bank", 0.90, 0.92, 0.6, 0.85, llamdex_on_api_rows=0.80)], tol)[0]
    assert "(Llamdex 80.0 on the same 4 rows)" in worse_there and worse_there.endswith(": NO")
    better_there = bench.verdicts([_result("bank", 0.84, 0.88, 0.6, 0.85, llamdex_on_api_rows=0.90)], tol)[0]
    assert better_there.endswith(": yes")


def test_merge_orders_datasets_and_keeps_every_run(tmp_path):
    for stem, names in (("a", ["nursery", "titanic"]), ("b", ["bank"])):
        payload = {"command": f"run {stem}", "args": {"api_rows": 5, "model": "tiny-random"},
                   "results": [_result(n, 0.8, 0.81, 0.5, 0.3) for n in names]}
        (tmp_path / f"{stem}.json").write_text(json.dumps(payload))
    out = tmp_path / "out"
    merged = bench.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")], out, "all")
    assert [r["dataset"] for r in merged] == ["titanic", "nursery", "bank"]
    md = (out / "all.md").read_text()
    assert "run a ; run b" in md and "| method | titanic | nursery | bank |" in md
    assert md.count("(target ≤ 3: met)") == 2 and "(target ≤ 5: met)" in md
    assert json.loads((out / "all.json").read_text())["args"]["merged"][1].endswith("b.json")
    assert (out / "all.png").stat().st_size > 0


def test_recorded_commands_can_be_pasted_back():
    """A results file's command re-splits into the same arguments (JSON and spaces survive)."""
    import shlex

    from bench.common import command_line

    argv = ["--connectors", '{"time_budget_s": 600}', "--name", "a b"]
    assert shlex.split(command_line("bench.llamdex_accuracy", argv)) == ["python", "-m", "bench.llamdex_accuracy", *argv]


def test_feature_targets_and_the_old_family_row():
    """Reading targets per feature (category/bool >= 95 %, numeric MAE < half the mean's), and the old
    held-out family's Llamdex row next to the main family's."""
    good = _result("titanic", 0.8, 0.81, 0.5, 0.3)
    good["fidelity"] = {"age": {"mae": 1.4, "mae_baseline": 3.0, "range": 100.0},
                        "sex": {"accuracy": 0.95, "accuracy_baseline": 0.6}}
    bad = _result("nursery", 0.8, 0.81, 0.5, 0.3)
    bad["fidelity"] = {"age": {"mae": 1.6, "mae_baseline": 3.0, "range": 100.0},
                       "sex": {"accuracy": 0.94, "accuracy_baseline": 0.6}}
    good["other_families"] = {"heldout": {"accuracy": 0.7, "fidelity": good["fidelity"]}}
    lines = bench.feature_verdicts([good, bad])
    assert lines[0].endswith(": met") and "MISSED: age MAE 1.6 (half the mean's: 1.5), sex 94.0 %" in lines[1]
    rows = bench.table([good, bad])
    old = next(r for r in rows if r["method"] == bench.OLD_FAMILY_ROW)
    assert old == {"method": bench.OLD_FAMILY_ROW, "titanic": "70.0", "nursery": ""}
    assert [r["method"] for r in rows].index(bench.OLD_FAMILY_ROW) == 1 + [r["method"] for r in rows].index(
        "Llamdex, non-DP expert")
    assert "| titanic | age | MAE 1.4 | MAE 1.4 |" in "\n".join(bench.fidelity_table([good]))


def test_latency_targets_compare_llamdex_with_the_base_traffic_of_its_own_run():
    """Each mixed run has its own base requests; the ratio must use those of the Llamdex run (a shared
    label once made the Expert-API run's base traffic the denominator: 1.87 instead of 1.04)."""
    from bench.llamdex_latency import latency_goals

    conc, conc_api = "C=8, Llamdex + base", "C=8, Expert-API + base"
    rows = [("single", "llamdex", 929), ("single", "base", 876), ("single", "expert-api", 6422),
            ("single", "expert-api (generate_queries, shared prefix)", 7359), (conc, "llamdex", 5369),
            (conc, "base", 5139), (conc_api, "expert-api", 18923), (conc_api, "base", 2867)]
    goals = latency_goals([{"load": a, "method": b, "p50_ms": c} for a, b, c in rows], conc, conc_api)
    assert goals["single_vs_base"] == 1.06 and goals["mixed_vs_base"] == 1.04 and goals["latency_ok"]
    assert goals["single_speedup_vs_expert_api"] == 6.9 and goals["mixed_speedup_vs_expert_api"] == 3.5
    assert not goals["speedup_ok"] and "answer_speedup_ok" not in goals  # rows without answer times
    answered = [{"load": a, "method": b, "p50_ms": c, "answer_p50_ms": c / 8 if b == "llamdex" else c}
                for a, b, c in rows]
    goals = latency_goals(answered, conc, conc_api)
    assert goals["single_answer_speedup_vs_expert_api"] == round(6422 / (929 / 8), 1)
    assert goals["mixed_answer_speedup_vs_expert_api"] == round(18923 / (5369 / 8), 1) and goals["answer_speedup_ok"]


def test_the_ablation_tools_cannot_select_the_test_split():
    import subprocess
    import sys

    from tests.conftest import ROOT

    for tool in ("bench.llamdex_encoders", "bench.llamdex_decoders", "bench.llamdex_assignment"):
        bad = subprocess.run([sys.executable, "-m", tool, "--split", "test"], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and "unrecognized arguments: --split" in bad.stderr, (tool, bad.stderr[-300:])
        text = (ROOT / (tool.replace(".", "/") + ".py")).read_text()
        assert '"validation"' in text and '"test"' not in text  # scores validation rows, never names the test split


def test_the_greedy_baseline_is_the_old_assignment_and_joint_beats_it_where_greedy_fails():
    import torch

    from bench.llamdex_assignment import greedy_distinct
    from llamdex.encoder import assign_distinct

    leaning = torch.tensor([[0.44, 0.55, 0.01], [0.005, 0.5, 0.03]])  # both lean on token 1
    assert greedy_distinct(leaning) == {0: 1, 1: 2} and assign_distinct(leaning) == {0: 0, 1: 1}
    clear = torch.tensor([[0.97, 0.0], [0.6, 0.3]])
    assert greedy_distinct(clear) == assign_distinct(clear) == {0: 0, 1: 1}


def test_misreads_sums_the_pointer_mass_over_the_read_literals_tokens():
    """bench.llamdex_misreads: the mass on the literal a feature reads is summed over every token of that literal
    (same kind and value), and "not stated" is the last column."""
    from types import SimpleNamespace

    import torch

    from bench.llamdex_misreads import literal_mass

    # one question, 4 tokens: "one hundred" (two tokens, value 100), "7", "yes"; two features
    kinds = torch.tensor([[1, 1, 1, 2]])
    values = torch.tensor([[100.0, 100.0, 7.0, 1.0]])
    probs = torch.tensor([[[0.45, 0.45, 0.05, 0.0, 0.05],     # feature 0 reads "one hundred": 0.9
                           [0.1, 0.0, 0.3, 0.0, 0.6]]])        # feature 1 reads "7" (0.3), mostly not stated
    raw = SimpleNamespace(pointer_logits=probs.log(), literals=SimpleNamespace(kinds=kinds, values=values))
    encoder = SimpleNamespace(_one_each=lambda raw: torch.tensor([[0, 2]]))
    mass, none = literal_mass(encoder, raw)
    assert torch.allclose(mass, torch.tensor([[0.9, 0.3]])) and torch.allclose(none, torch.tensor([[0.05, 0.6]]))


def test_the_llamdex_probe_says_only_schema_values():
    """bench.llamdex_probe's questions name real features and valid values; an unknown dataset is refused by name."""
    import pytest

    from bench.llamdex_encoders import ROOT
    from bench.llamdex_probe import read_probe, same
    from llamdex.schema import load_schema

    schema = load_schema(str(ROOT / "examples" / "schemas" / "titanic.json"))
    features = {f.name: f for f in schema.features}
    probes = read_probe("titanic")
    assert len(probes) >= 25 and len({q["question"] for q in probes}) == len(probes)
    for q in probes:
        assert q["says"] and set(q["says"]) <= set(features), q
        for name, value in q["says"].items():
            f = features[name]
            assert value in f.categories if f.type == "category" else f.lo <= value <= f.hi, (name, value)
    assert same(4.0, 4) and same("first", "first") and not same(None, 0) and not same(8.0, 4)
    with pytest.raises(SystemExit, match="no probe for 'nope'"):
        read_probe("nope")


def test_the_probe_reads_another_question_file_and_names_a_bad_line(tmp_path):
    """``--questions``: any JSONL of {question, says} is scored instead of the dataset's probe; a line without
    them is refused with its number, a missing file by its path."""
    import json

    import pytest

    from bench.llamdex_probe import read_probe

    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question": "A woman of 30 in 3rd class - did she survive?",
                                "says": {"sex": "female", "age": 30}}) + "\n")
    assert read_probe("titanic", good)[0]["says"]["age"] == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"question": "no says"}) + "\n")
    with pytest.raises(SystemExit, match="line 2 needs"):
        read_probe("titanic", bad)
    with pytest.raises(SystemExit, match="missing"):
        read_probe("titanic", tmp_path / "none.jsonl")


def test_the_independent_sets_state_valid_values_and_carry_their_rows_labels():
    """Each independent set says every feature of its schema (nursery_validation_c: three to six of them) with a
    valid value and carries its row's class (for the probe's accuracy); a label that is not a class is refused by name before any model runs."""
    import argparse
    import json

    import pytest

    from bench.llamdex_encoders import ROOT
    from bench.llamdex_probe import labelled_baselines, read_probe
    from llamdex.datasets import load_splits

    for path in sorted((ROOT / "bench" / "data" / "llamdex_independent").glob("*.jsonl")):
        dataset = path.stem.split("_")[0]
        splits = load_splits(dataset, ROOT / "examples" / "datasets")
        classes = {c.name for c in splits.schema.target.classes}
        probes = read_probe(dataset, path)
        assert len(probes) >= 50 and len({q["question"] for q in probes}) == len(probes), path
        for q in probes:
            assert q["label"] in classes, (path, q["label"])
            names = {f.name for f in splits.schema.features}
            partial = path.stem == "nursery_validation_c"  # the one set that leaves features out
            assert set(q["says"]) == names if not partial else set(q["says"]) < names and len(q["says"]) >= 3, path
            for f in (f for f in splits.schema.features if f.name in q["says"]):
                v = q["says"][f.name]
                assert v in f.categories if f.type == "category" else f.lo <= v <= f.hi, (path, f.name, v)
    bad = [dict(probes[0], label="maybe")]
    args = argparse.Namespace(cache="/nonexistent", dataset=dataset, seed=0)
    with pytest.raises(SystemExit, match="label 'maybe' is not a class"):
        labelled_baselines(args, None, None, splits, bad)
    assert json.loads(path.read_text().splitlines()[0])["label"] in classes


def test_the_meaning_grid_counts_recovered_wrong_and_false_fills(tmp_path, monkeypatch):
    """bench.llamdex_meaning on two validation-style questions: only categories the probe row read as "not
    stated" may be filled, each counted right or wrong against what the question says; a probe row that
    already reads by meaning is refused."""
    import pytest

    from bench import llamdex_meaning

    monkeypatch.setattr(llamdex_meaning, "MARGINS", (0.03, 0.05))  # a small grid: the counting is what is tested
    monkeypatch.setattr(llamdex_meaning, "OVER_LABEL", (-2.0, 0.025))
    says = {"parents": "usual", "has_nurs": "proper", "form": "complete", "children": "2", "housing": "convenient",
            "finance": "inconv", "social": "nonprob", "health": "recommended"}
    questions = [{"question": "The family is in serious debt. Our house is large and quiet.", "says": says}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in questions))
    misses = [{"question": questions[0]["question"], "feature": f, "says": says[f], "read": "not stated"}
              for f in ("finance", "housing")]
    probe = {"results": [{"connectors": "c"}], "misses": {"c": misses}}
    (tmp_path / "p.json").write_text(json.dumps(probe))
    table = llamdex_meaning.main(["--questions", str(tmp_path / "q.jsonl"), "--probe", str(tmp_path / "p.json"),
                                  "--synthetic", "5", "--out", str(tmp_path), "--name", "m"])
    assert len(table) == 8 and sum(r["default"] == "yes" for r in table) == 1  # 2 fallback × 2 margins × 2 over_label
    assert {r["over_label"] for r in table} == {"off", 0.025} and {r["fallback"] for r in table} == {False, True}
    default = next(r for r in table if r["default"] == "yes")
    assert default["recovered"] == "2/2" and default["wrong fills"] == 0
    probe["results"][0]["connectors"] = "c + meaning reader"
    (tmp_path / "p.json").write_text(json.dumps(probe))
    with pytest.raises(SystemExit, match="already reads by meaning"):
        llamdex_meaning.main(["--questions", str(tmp_path / "q.jsonl"), "--probe", str(tmp_path / "p.json"),
                              "--out", str(tmp_path)])


def test_the_probe_scores_several_meaning_configs_each_labelled():
    """``--meaning-config`` items (JSON or label=JSON) become readers scored in one run; one item keeps the plain
    label; a field MeaningConfig does not have is refused by name."""
    import pytest

    from bench.llamdex_probe import meaning_configs
    from llamdex.meaning import MeaningConfig

    assert meaning_configs(["{}"]) == [("", MeaningConfig())]
    two = meaning_configs(['{"margin": 0.05}', 'fallback={"fallback": true}'])
    assert [label for label, _ in two] == [' ({"margin": 0.05})', " (fallback)"]
    assert two[0][1].margin == 0.05 and two[1][1].fallback and not two[0][1].fallback
    with pytest.raises(SystemExit, match="nope"):
        meaning_configs(['x={"nope": 1}'])
