"""Llamdex science package (arXiv 2410.10481): plain torch/numpy/pandas/scikit-learn, no Ray.

Modules, by what they are for (import the submodules directly; this package module imports
nothing, which keeps imports cheap):

* the tenant's side -- ``schema`` (the public JSON schema of a private table), ``datasets`` (the
  paper's four tables), ``codec`` (rows <-> the expert's input vector), ``expert_spec`` / ``expert``
  (the MLP expert and its expert.json + safetensors format), ``dp_training`` (Opacus DP-SGD + ledger);
* questions -- ``synthetic`` (rows from the schema alone), ``coverage`` (rows spread over each
  range), ``vocabulary`` / ``render`` / ``literals`` (how values are written and found again),
  ``grammar`` / ``phrasings`` / ``questions`` (the training grammar and the old held-out family),
  ``family`` (phrasing families as data: the validation and blind test families);
* connectors -- ``encoder`` (layer-k hidden states -> expert features), ``connectors`` (the decoder:
  expert output -> slot vectors), ``connectors_io`` (connectors.json + safetensors), ``prompting``
  (system prompt and single-token answers), ``hidden_cache`` (the frozen LLM run once over the
  training prompts), ``stages`` (the two training stages), ``pipeline`` (schema -> trained connectors);
* inside the forward pass -- ``llm_ops`` (overwrite at layer k, run only the slots), ``insertion``
  (the expert spliced into generation and prediction);
* measuring -- ``evaluation`` (real rows, the paper's baselines, who may read which split),
  ``expert_api`` (the Expert-API baseline); ``_validation`` turns pydantic errors into field messages.

What every user of the LLM needs (backbone, layer count, left padding, chat encoding, end of
turn) is in :mod:`causal_lm`, shared with ``compression.codebook`` and the serving engines.
"""
