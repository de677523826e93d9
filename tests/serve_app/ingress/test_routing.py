"""model="auto" without Ray: the recommender on the real MiniLM embedder, the router's catalog
over a real registry (adapters in a real bank of the tiny model, an expert with its schema),
feedback that changes routing, tenant isolation, and the errors users get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.ingress.routing import (
    BASE,
    DEFAULT_THRESHOLDS,
    MemoryItem,
    Recommender,
    adapter_profile,
    check_examples,
    expert_profile,
)
from serve_app.ingress.routing.profiles import description_fragments

Z = DEFAULT_THRESHOLDS["minilm"]  # the validated default gate

ROOT = Path(__file__).resolve().parents[3]
SCHEMAS = ROOT / "examples" / "schemas"
PIRATE = "writes in a pirate voice for ship stories"


@pytest.fixture(scope="module")
def minilm():
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder

    return CachedEmbedder(MiniLMEmbedder(threads=1))


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def demo_profiles():
    titanic, nursery = schema("titanic"), schema("nursery")
    return [expert_profile("demo/survival", titanic["description"], titanic),
            expert_profile("demo/nursery", nursery["description"], nursery),
            adapter_profile("demo/style", PIRATE)]


def test_the_issue_example_routes_all_three(minilm):
    """The issue's tenant: the old TF-IDF auto got one of these three right."""
    from serve_app.ingress.routing import DEFAULT_THRESHOLDS

    rec = Recommender(minilm, DEFAULT_THRESHOLDS["minilm"])
    profiles = demo_profiles()
    cases = {"A 30 year old man in third class paid 8 pounds. Did he survive the Titanic sinking?": "demo/survival",
             "Write me a pirate story about ships": "demo/style",
             "Two children, parents with usual jobs, critical housing: how is our nursery school application "
             "ranked?": "demo/nursery",
             "What is the derivative of x cubed?": BASE}
    for prompt, want in cases.items():
        got = rec.recommend(prompt, profiles)
        assert got.chosen == want, (prompt, got.explain())
    why = rec.recommend("Write me a pirate story about ships", profiles).explain()
    assert why["matched"]["document"] == PIRATE and why["score"] >= why["threshold"]
    assert [c["model"] for c in why["candidates"]][0] == "demo/style" and json.dumps(why)


def test_the_configured_default_recommender_routes_the_issue_example():
    """What ``model="auto"`` runs out of the box (RoutingConfig's defaults through build_recommender, the
    shipped intent adapter included when that is the default) gets the issue's tenant right."""
    from serve_app.config import RoutingConfig
    from serve_app.ingress.routing import build_recommender

    cfg = RoutingConfig()
    rec = build_recommender(cfg)
    assert cfg.method != "minilm-intent" or rec.embedder.name.endswith("+intent_minilm")
    cases = {"A 30 year old man in third class paid 8 pounds. Did he survive the Titanic sinking?": "demo/survival",
             "Write me a pirate story about ships": "demo/style",
             "Our family has two children and critical housing; how would the nursery school rank our "
             "application?": "demo/nursery",
             "How do I renew my passport before a trip next month?": BASE}
    if cfg.method == "minilm-intent":  # history questions the plain embedder sends to the pirate adapter
        cases |= {p: BASE for p in ("Explain how real pirate ships were crewed in history",
                                    "What did real pirate ships look like in the 1700s?")}
    for prompt, want in cases.items():
        assert rec.recommend(prompt, demo_profiles()).chosen == want, prompt


def test_profiles_hold_schema_and_description_parts():
    p = expert_profile("t/survival", "", schema("titanic"), schema_questions=3)
    assert "Did the passenger survive the sinking?" in p.documents
    assert "Did the passenger survive the sinking? died in the sinking" in p.documents
    assert p.sources.count("schema question") == 3 and "features" in p.sources
    assert description_fragments("Cooking assistant: recipes, substitutions and meal plans.") == [
        "Cooking assistant: recipes, substitutions and meal plans.", "Cooking assistant: recipes",
        "Cooking assistant: substitutions", "Cooking assistant: meal plans"]
    a = adapter_profile("t/sql", "SQL helper", ["Join two tables", "Explain GROUP BY"])
    assert a.documents == ("SQL helper", "Join two tables", "Explain GROUP BY")
    assert a.sources == ("description", "example", "example")


@pytest.mark.parametrize("value, fragment", [
    ("one prompt", "not one string"), ([1, 2], "list of strings"), (["x"] * 51, "at most 50"),
    (["y" * 2001], "longer than 2000")])
def test_examples_are_validated(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_examples(value)
    assert check_examples(["  a prompt ", ""]) == ["a prompt"]


def test_questions_about_a_subject_and_prompts_stating_nothing_go_to_base(minilm):
    """The two checks: a prompt nearer to a question *about* a customization's subject than to what it
    is for, and a prompt that states no value an expert could read, go to base, each saying why;
    without the checks the same prompts went to the customization."""
    profiles = demo_profiles()
    checked, unchecked = Recommender(minilm, Z), Recommender(minilm, Z, topic_margin=None, require_evidence=False)
    movie = "Which actors were in Titanic?"
    assert unchecked.recommend(movie, profiles).chosen == "demo/survival"
    got = checked.recommend(movie, profiles)
    assert got.chosen == BASE and got.explain()["checks"]["expert_values_stated"] == []
    assert "states none of the values" in got.why
    piracy = "When did the golden age of piracy end historically?"
    assert unchecked.recommend(piracy, profiles).chosen == "demo/style"
    got = checked.recommend(piracy, profiles)
    assert got.chosen == BASE and "subject" in got.why
    assert got.explain()["checks"]["about_not_for"]["margin"] < checked.topic_margin
    story = checked.recommend("Write me a pirate story about ships", profiles)  # asking *for* the task still routes
    assert story.chosen == "demo/style" and story.explain()["checks"]["about_not_for"]["margin"] >= checked.topic_margin
    survived = checked.recommend("A 30 year old man in third class paid 8 pounds. Did he survive?", profiles)
    assert survived.chosen == "demo/survival"
    assert set(survived.explain()["checks"]["expert_values_stated"]) == {"pclass", "sex", "age", "fare"}


def test_a_number_is_evidence_only_beside_its_features_words():
    """Numbers count for the feature whose name, alias, unit or counted noun is written beside them; the
    numbers of an invoice or a contract (inside some feature's range) state nothing; a stop word that is
    also a value ("may" the month, "her", "third") is not a value by itself (so "in May" is not evidence either)."""
    from serve_app.ingress.routing.evidence import FeatureEvidence

    titanic, bank = FeatureEvidence(schema("titanic")), FeatureEvidence(schema("bank"))
    assert titanic.stated("Invoice 4471: 3 items, total 80, payable within 30 days of delivery.") == []
    assert set(titanic.stated("She was 4 years old and travelled with 2 siblings; the fare was £15.")) == {
        "age", "sibsp", "fare"}
    assert bank.stated("The tenant may terminate this lease; see her third notice.") == []
    assert bank.stated("What causes déjà vu? Is it a brain glitch or something else?") == []  # all stop words
    assert bank.stated("She was never contacted before this campaign.") == ["pdays", "previous"]
    assert titanic.stated("I live alone and like to be on my own.") == []
    assert set(titanic.stated("An 18-year-old travelling alone.")) == {"sibsp", "parch", "age"}
    assert set(bank.stated("age=41, balance: 1200 euros, called 3 times, last contact in June")) == {
        "month", "age", "balance", "campaign"}


def test_an_expert_needs_two_stated_values(minilm):
    """One value is a mention, not a case: "red wine" alone does not reach the wine expert (it did when
    one value sufficed); two values do, whatever their kind."""
    wine = schema("wine")
    profiles = [expert_profile("demo/wine", wine["description"], wine)]
    one = "How do I get a red wine stain out of a white carpet?"
    assert Recommender(minilm, 0.0, topic_margin=None, min_values=1).recommend(one, profiles).chosen == "demo/wine"
    got = Recommender(minilm, 0.0, topic_margin=None).recommend(one, profiles)
    assert got.chosen == BASE and got.explain()["checks"]["expert_values_stated"] == ["type"]
    assert "states only 1 of the values" in got.why and "needs 2" in got.why
    two = "A red wine with 12.5 % alcohol: what quality score would it get?"
    assert Recommender(minilm, 0.0, topic_margin=None).recommend(two, profiles).chosen == "demo/wine"


def test_a_long_prompt_is_also_read_by_its_first_and_last_sentence(minilm):
    """The request around a pasted document decides: the whole text is about the document's subject,
    its first sentence says what the user wants."""
    profiles = [adapter_profile("demo/legal", "Summarises legal documents in plain English: contracts, leases, "
                                              "terms of service."),
                adapter_profile("demo/recipes", "Cooking assistant: recipes, substitutions, cooking times.")]
    pasted = ("What are my obligations under this contract, in plain words?\nPreheat the oven to 180 degrees. "
              "Cream the butter and sugar, beat in the eggs, fold in the flour and bake the sponge for 25 minutes "
              "until golden. Dust with icing sugar and serve with cream and strawberries.")
    rec = Recommender(minilm, 0.0, topic_margin=None, require_evidence=False)
    assert [n for n, _ in rec.views(pasted)] == ["first sentence", "last sentence"]
    assert rec.views("Write a haiku about snow.") == []
    whole = Recommender(minilm, 0.0, topic_margin=None, require_evidence=False, views_min_words=None)
    assert whole.recommend(pasted, profiles).candidates[0]["model"] == "demo/recipes"
    got = rec.recommend(pasted, profiles)
    assert got.chosen == "demo/legal" and got.explain()["matched"]["prompt_view"] == "first sentence"


def test_the_evidence_check_follows_a_feedback_veto_to_the_next_candidate(minilm):
    """When feedback vetoes the best-ranked customization, the next one is checked too: an expert
    the prompt states nothing for is not chosen in its place."""
    titanic = schema("titanic")
    profiles = [expert_profile("demo/survival", titanic["description"], titanic),
                adapter_profile("demo/films", "Answers questions about films, actors and directors: who starred "
                                              "in a movie, who directed it.")]
    prompt = "Which actors starred in the Titanic film?"
    veto = [MemoryItem("Which actors starred in the movie Titanic?", "demo/films", -1)]
    rec = Recommender(minilm, Z)
    first = rec.recommend(prompt, profiles)
    assert first.chosen == "demo/films" and first.candidates[1]["model"] == "demo/survival"
    assert first.candidates[1]["z"] >= rec.threshold  # the expert would pass the gate on its own
    got = rec.recommend(prompt, profiles, veto)
    assert got.vetoed == ["demo/films"] and got.chosen == BASE
    assert got.explain()["checks"]["expert_values_stated"] == [] and "states none" in got.why
    without = Recommender(minilm, Z, require_evidence=False).recommend(prompt, profiles, veto)
    assert without.chosen == "demo/survival"


def test_subject_terms_come_from_the_description(minilm):
    """The about-not-for check's subject words are the customization's own, not everyday words."""
    from serve_app.ingress.routing.background import GENERAL_REQUESTS
    from serve_app.ingress.routing.topics import candidate_terms, topic_questions, topic_terms

    assert candidate_terms(["Writes in a pirate voice for ship stories"]) == sorted(
        ["writes", "pirate", "voice", "ship", "stories", "pirate voice", "ship stories"])
    general = minilm.encode(list(GENERAL_REQUESTS)).mean(0)
    terms = topic_terms(adapter_profile("a/style", PIRATE), minilm.encode, general)
    assert len(terms) == 4 and "pirate voice" in terms and "writes" not in terms
    assert "Who invented pirate voice?" in topic_questions(terms)


def test_feedback_memory_overrides_and_vetoes(minilm):
    rec = Recommender(minilm, 2.95, topic_margin=None, require_evidence=False)  # so that it makes the mistake
    profiles = demo_profiles()
    movie = "Which actors were in Titanic?"
    assert rec.recommend(movie, profiles).chosen == "demo/survival"  # the mistake feedback will fix
    memory = [MemoryItem("Who starred in the 1997 Titanic movie?", BASE),
              MemoryItem("Who directed the movie Titanic?", BASE)]
    fixed = rec.recommend(movie, profiles, memory)
    assert fixed.chosen == BASE and "feedback_prompt" in fixed.matched
    assert rec.recommend("A 30 year old man in third class paid 8 pounds. Did he survive the Titanic sinking?",
                         profiles, memory).chosen == "demo/survival"  # other prompts are not affected
    vetoed = rec.recommend(movie, profiles, [MemoryItem("Who starred in the 1997 Titanic movie?", "demo/survival",
                                                        -1)])
    assert vetoed.chosen != "demo/survival" and vetoed.vetoed == ["demo/survival"]


# ------------------------------------------------------------------ the router's catalog, no Ray
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Two tenants with the same three customizations on one registry; one pool of tiny-random."""
    from cluster.banks import add_to_bank
    from cluster.registry import Registry
    from serve_app.config import load_app_config
    from serve_app.ingress.catalog import Catalog
    from tests.serve_fixtures import make_peft_adapter

    work = tmp_path_factory.mktemp("routing")
    registry = Registry(str(work / "store"))
    peft = make_peft_adapter(tiny_model.path, work / "peft", seed=1)
    files = {p.name: p.read_bytes() for p in peft.iterdir() if p.suffix in (".json", ".safetensors")}
    keys = {}
    for tenant in ("acme", "globex"):
        _, keys[tenant] = registry.create_tenant(tenant)
        registry.publish(tenant, "adapter", "style", files, {"description": PIRATE})
        registry.publish(tenant, "adapter", "sql", files, {
            "description": "SQL helper", "examples": ["Join the orders and customers tables.",
                                                     "Why does my GROUP BY query fail?"]})
        for name in ("style", "sql"):
            add_to_bank(registry, "default", tiny_model, tenant, name)
    # the plain embedder: the feedback tests need a router that sends history questions to the pirate adapter
    # (the default, intent-tuned router sends them to base: test_the_configured_default_recommender_...)
    config = load_app_config({"pools": [{"name": "default", "model": "tiny-random"}], "routing": {"method": "minilm"}})
    catalog = Catalog(registry, config)
    principals = {t: registry.authenticate(k) for t, k in keys.items()}
    return {"catalog": catalog, "registry": registry, "who": principals,
            "admin": registry.authenticate(registry.issue_key(None, scope="admin"))}


def auto(world, tenant: str, prompt: str, response_id: str | None = None):
    from serve_app.ingress.routing.feedback import Decision

    target = world["catalog"].resolve(world["who"][tenant], "auto", prompt, None)
    if response_id:  # what routes_openai does with the response's id
        world["catalog"].feedback.record(Decision(id=response_id, tenant=tenant, prompt=prompt,
                                                  chosen=target.model_id))
    return target


def test_catalog_routes_by_examples_and_explains(world):
    t = auto(world, "acme", "Write a query that counts orders per customer")
    assert t.model_id == "acme/sql" and t.kind == "adapter" and t.routing["auto"] is True
    assert t.routing["matched"]["source"] in ("example", "description") and t.routing["chosen"] == "acme/sql"
    b = auto(world, "acme", "What is the capital of Peru?")
    assert b.model_id == "base" and "threshold" in b.routing["why"]


def test_feedback_teaches_one_tenant_only(world):
    from serve_app.ingress.catalog import apply_feedback
    from serve_app.ingress.routing.feedback import FeedbackRequest

    catalog = world["catalog"]
    wrong = ["Explain how real pirate ships were crewed in history", "What did real pirate ships look like in the 1700s?",
             "How were real pirate ships built in history?"]  # history questions the about-not-for check lets through
    assert [auto(world, "acme", p).model_id for p in wrong] == ["acme/style"] * 3  # history is not a pirate story
    for i, prompt in enumerate(wrong):
        chosen = auto(world, "acme", prompt, response_id=f"chatcmpl-test{i}").model_id
        out = apply_feedback(catalog, world["who"]["acme"], FeedbackRequest(id=f"chatcmpl-test{i}", right_model="base"))
        assert out["chosen"] == chosen and out["recorded"][0] == {"label": "base", "vote": 1}
        if chosen == "acme/style":  # a wrong choice is also vetoed for prompts this alike
            assert out["recorded"][1] == {"label": "acme/style", "vote": -1}
    catalog.feedback._memory.clear()  # other router replicas read the store: so does this one now
    again = auto(world, "acme", "What were real pirate ships like in history?")
    assert again.model_id == "base" and "feedback_prompt" in again.routing["matched"]
    assert auto(world, "acme", "Write me a pirate story about ships").model_id == "acme/style"
    assert auto(world, "globex", "What were real pirate ships like in history?").model_id == "globex/style"  # isolated
    stored = world["registry"].store.list_dir("routing/acme/feedback")
    assert 3 <= len(stored) <= 6 and not world["registry"].store.list_dir("routing/globex/feedback")
    assert all(n.endswith(".json") for n in stored)


def test_feedback_errors(world):
    from serve_app.ingress.catalog import apply_feedback
    from serve_app.ingress.openai_api import OpenAIError
    from serve_app.ingress.routing.feedback import FeedbackRequest

    catalog, who = world["catalog"], world["who"]
    auto(world, "acme", "Write a query that counts orders per customer", response_id="chatcmpl-err")
    with pytest.raises(OpenAIError, match="no model='auto' response") as e:  # another tenant's response
        apply_feedback(catalog, who["globex"], FeedbackRequest(id="chatcmpl-err", rating="up"))
    assert e.value.status == 404
    with pytest.raises(OpenAIError, match="not one of your customizations") as e:
        apply_feedback(catalog, who["acme"], FeedbackRequest(id="chatcmpl-err", right_model="globex/sql"))
    assert e.value.status == 422 and e.value.param == "right_model"
    with pytest.raises(OpenAIError) as e:
        apply_feedback(catalog, world["admin"], FeedbackRequest(id="chatcmpl-err", rating="up"))
    assert e.value.status == 400
    with pytest.raises(ValueError, match="exactly one of"):
        FeedbackRequest(id="x", rating="up", right_model="base")
    up = apply_feedback(catalog, who["acme"], FeedbackRequest(id="chatcmpl-err", rating="up"))
    assert up["recorded"] == [{"label": "acme/sql", "vote": 1}]


def test_decisions_survive_the_replica_that_made_them(world, tmp_path):
    """Another router replica (a fresh store object) finds a decision persisted by this one."""
    from serve_app.ingress.routing.feedback import Decision, FeedbackStore

    store = world["registry"].store
    a, b = FeedbackStore(store), FeedbackStore(store)
    a.record(Decision(id="chatcmpl-elsewhere", tenant="acme", prompt="p", chosen="acme/sql"))
    a._writer.shutdown(wait=True)
    found = b.decision("acme", "chatcmpl-elsewhere")
    assert found is not None and found.chosen == "acme/sql"
    assert b.decision("globex", "chatcmpl-elsewhere") is None and b.decision("acme", "../keys") is None


def test_feedback_memory_keeps_the_newest_per_tenant(registry):
    from serve_app.ingress.routing.feedback import Feedback, FeedbackStore

    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    store = FeedbackStore(registry.store, memory_size=3, cache_ttl_s=0)
    for i in range(5):
        store.add(Feedback(response_id=f"r{i}", tenant="acme", prompt=f"prompt {i}", label=BASE, vote=1,
                           chosen="acme/x", created_at=1000.0 + i))
    assert [m.prompt for m in store.memory("acme")] == ["prompt 2", "prompt 3", "prompt 4"]
    assert len(registry.store.list_dir("routing/acme/feedback")) == 3
    assert store.memory("globex") == [] and store.memory(None) == []
