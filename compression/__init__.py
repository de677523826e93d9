"""Joint compression of LoRA collections ("Compress then Serve", arXiv 2407.00066) and batched serving.

Modules, one idea each:
    lora_io      PEFT LoRA directories <-> typed LoraAdapter (α/r folded into B)
    factors      zero-padded factor stacks of one module
    jd           SVD baseline, JD-Full, JD-Diag, projection, reconstruction error (from factors)
    clustering   k-means over subspaces: one cluster per adapter, cost summed over modules
    bank         the Bank dataclass and its safetensors + JSON format
    collection   compress_collection / svd_bank / add_adapter / export_adapter / parameter counts
    exact        adapters stored exactly (own factors in exact clusters) when projection exceeds a budget
    batched      per-row mixed-adapter forward (bank_delta, BankLinear, attach_bank)
    selection    fit a bank within an error budget, measure it, pick the smallest of several fits
    synthetic_adapters  synthetic LoRA collections with planted clusters (tests, benchmarks)
    codebook/    the tenant-codebook LoRA tasks: train and evaluate the adapters benchmarked here
"""

from compression.bank import (
    Bank,
    ModuleBank,
    bank_param_count,
    exact_param_count,
    load_bank,
    mean_recon_errors,
    save_bank,
)
from compression.batched import BankHandle, BankLinear, attach_bank, bank_delta
from compression.collection import (
    adapter_factors,
    add_adapter,
    collection_param_count,
    compress_collection,
    export_adapter,
    svd_bank,
)
from compression.errors import AdapterFormatError, BankFormatError
from compression.exact import (
    DEFAULT_ERROR_BUDGET,
    Placement,
    add_exact,
    add_within_budget,
    exact_bank,
    remove_adapter,
    serve_within_budget,
)
from compression.jd import JDConfig
from compression.lora_io import LoraAdapter, linear_shapes, load_peft_adapter, save_peft_adapter

__all__ = [
    "DEFAULT_ERROR_BUDGET",
    "AdapterFormatError",
    "Bank",
    "BankFormatError",
    "BankHandle",
    "BankLinear",
    "JDConfig",
    "LoraAdapter",
    "ModuleBank",
    "Placement",
    "adapter_factors",
    "add_adapter",
    "add_exact",
    "add_within_budget",
    "attach_bank",
    "bank_delta",
    "bank_param_count",
    "collection_param_count",
    "compress_collection",
    "exact_bank",
    "exact_param_count",
    "export_adapter",
    "linear_shapes",
    "load_bank",
    "load_peft_adapter",
    "mean_recon_errors",
    "save_bank",
    "remove_adapter",
    "save_peft_adapter",
    "serve_within_budget",
    "svd_bank",
]
