"""The standalone trainer (`python -m megatron_dsv3.train`) and its parts:

    arguments.py      Megatron-style flags -> DSV3Config (+ per-preset training defaults)
    loop.py           Trainer: parallel state, model chunks, DDP, distributed optimizer, one global batch per step,
                      expert-bias update, MTP lambda, evaluation, logs, checkpoints, greedy sample, load summary
    schedules.py      LR warmup / hold / cosine|linear|constant / tail, batch-size ramp-up (paper section 4.2)
    checkpointing.py  dist_checkpointing save/resume, atomic (temp dir + rename + `latest` written last)
    data.py           GPT datasets over indexed datasets, micro-batches by global sample position
    tokenizer.py      byte-level default (no download) and Hugging Face tokenizer.json
    preprocess.py     jsonl/text -> .bin/.idx (Punkt sentence splitting trained on the corpus, workers)
    corpus.py         the quick start's corpus, built from the Python standard library's docstrings
    logger.py         console, progress bar, TensorBoard; tokens/s, TFLOP/s, MFU
    memory.py         per-GPU memory estimate printed by the launch shells
"""
