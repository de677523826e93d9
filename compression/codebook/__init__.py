"""Tenant codebooks: many small, measurable LoRA tasks for one base model, their training and evaluation.

The adapters the compression benchmarks compress and measure. Plain torch + transformers + peft:

    tasks    the task family (private facts over a shared question space), splits, metrics
    forward  exact, cached split forward passes (frozen lower layers computed once)
    train    train one adapter and write it as a PEFT directory
    store    the resumable directory of trained adapters (task.json records, index.json)

The Ray Train job that trains many at once is ``train_jobs.lora_adapters``.
"""
