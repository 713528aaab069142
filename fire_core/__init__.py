"""fire_core: feedback-refinement learning for vision-language models (FIRE and DRESS).

The numbered notebooks under ``notebooks/`` call into this package, one stage each::

    from fire_core import config
    from fire_core.stages import world as stage_world
    cfg = config.load("00_build_world", ["scale=smoke"])
    result = stage_world.run(cfg)

The package has floors, and imports only point down (``tests/test_layout.py`` checks it):

- bottom: ``config`` (typed Hydra config), ``provenance`` (manifests, stage runs, seeds),
  ``plots`` (every figure, with a sidecar), ``files`` (JSONL, the resumable shard store,
  request ids);
- mechanisms, one concept each: ``world`` (the synthetic world), ``checker`` (the answer
  checker), ``prompts``, ``feedback`` (the oracle), ``models`` (tokenizer, processor, VLMs,
  the KV-cache generator), ``vision`` (tower pretraining), ``language`` (text pretraining),
  ``sft`` (fine-tuning and the examples of each stage), ``records`` (sample records, splits,
  image look-up, the loaders of FIRE's and DRESS's released files), ``client`` (OpenAI-compatible endpoints), ``annotate``
  (FIRE-100K's annotators and filter), ``dress`` (DRESS's iterative generation-annotation and
  its annotators), ``dialogue`` (the batched dialogue engine), ``metrics`` (FIRE's
  free-dialogue metrics, text metrics, CHAIR, bootstrap), ``eval`` (predictions, fixed-dialogue
  evaluation, the metric command line);
- ``stages/``: ``common`` (what several stages share), then one module per stage, each with
  one entry point ``run(cfg)``: ``world`` (00), ``base_vlm`` (01), ``fire100k`` (02),
  ``teacher`` (03), ``student`` (04), ``fire1m`` (05), ``firebench`` (06), ``dress`` (07),
  ``figures`` (08);
- tools on top, using the mechanisms and never a stage: ``pipeline`` (the run planner ``make``
  calls), ``readiness`` (its checks of models, data, keys and device, and cost estimates),
  ``serve`` (a local OpenAI-compatible server), ``bench`` (``make bench``), ``audit``,
  ``report``.
"""

__version__ = "0.1.0"

import os as _os

# Reproducible floating point on the CPU (see provenance.make_deterministic): MKL reads these
# when it starts, so they are set before anything imports torch. The Makefile exports the same.
for _k, _v in (("MKL_CBWR", "AUTO,STRICT"), ("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE")):
    _os.environ.setdefault(_k, _v)
