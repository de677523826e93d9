"""Llamdex science package (arXiv 2410.10481): plain torch/numpy/pandas/scikit-learn, no Ray.

Modules: ``schema`` (public tenant schema), ``codec`` (features <-> expert input), ``datasets``
(the paper's four tables), ``synthetic`` (rows from the schema alone), ``phrasings`` /
``questions`` (template questions, train vs held-out families), ``expert_spec`` / ``expert``
(MLP expert, expert.json + safetensors), ``dp_training`` (Opacus DP-SGD training + ledger).
Import the submodules directly; this package module imports nothing (keeps imports cheap).
"""
