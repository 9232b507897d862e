"""GPU acceptance run: one offline command that proves each GPU-only path of the plugin with a measured figure.

`python -m opd_verl.acceptance` (or `scripts/gpu_acceptance.sh`) runs, in order:

1. ``environment``: CUDA visible; flash-attn, vLLM, veRL and opd_verl import; versions.
2. ``models``: the demo tokenizer, a Qwen3-architecture student (tied embeddings) and a larger teacher (untied),
   saved with a generation config (`models.py`).
3. components without Ray (`components.py`): teacher log-probs vs full HF logits, the memory of one long row,
   the student top-K hook on packed rows, one OPSD LoRA step.
4. trainer runs through veRL's loop (`runs.py`): ``exopd_iw_release`` 2 steps, ``opsd`` 2 steps with a checkpoint
   each step, then a resume that runs step 3.
5. checks that need 2+ GPUs (sequence parallelism, sharding across ranks, server teachers), reported as not run
   on a machine with fewer.
6. ``teacher_offload``, judged on the ``exopd_iw_release`` run's metrics: each offload of the colocated teacher
   freed its parameters' device memory (``torch.cuda.memory_allocated`` before/after, per worker process).

A summary table ends the run (`report.py`); the exit status is non-zero when any check failed, and the failed
checks are named. ``--dry-run`` does on CPU what needs no CUDA (models, argument handling, each trainer run's
command line and its config validation, the table); ``--device cpu`` runs the component checks on CPU as well.
The module ships with the wheel so that an installed package (e.g. the Docker image) can run it without a checkout.
"""
