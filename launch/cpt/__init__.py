"""The continual pre-training (CPT) experiment: which LR schedule, with or without replay, when the data shifts.

First a base is pre-trained on the first data phase until its validation loss flattens (``[experiment.base]``;
cached under ``data.cache_dir`` by a digest of everything that decides it, reused by every arm and rerun), or taken
from ``--base hf:DIR``. Every arm then continues that base (``model.init``) through the later phases of one config;
an arm only overrides ``schedule.*`` and rewrites the phase mixtures (its replay fraction). Each arm runs
in its own process (``--parallel N`` of them at once, single-threaded by default so results do not depend on N),
writes ``<out>/arms/<arm>/metrics.jsonl`` through the normal trainer, and marks itself finished with
``<out>/arms/<arm>/result.json`` (curves, LR, wall time, config digest). The report (``results.md``, ``results.json``,
``curves.png``) is recomputed from those files on every invocation, so a rerun skips finished arms and rebuilds the
table. An unfinished arm resumes from its newest checkpoint (``[checkpoint]`` of the experiment file, written under
the arm's directory); the curves keep the last row of every step, so a replayed step replaces the lost one.

The experiment file is a normal training config plus an ``[experiment]`` table::

    [experiment]
    parallel = 2                 # arms trained at once (processes)
    out = "runs/cpt-experiment"  # default output directory
    [[experiment.arms]]
    name = "cosine"
    description = "repeated cosine, re-warmed at every phase"
    replay = 0.0                 # fraction of every later phase spent on the earlier phases' domains
    schedule = { kind = "cosine", warmup_steps = 3 }
    [experiment.base]            # the stopping rule and schedule of the base's pre-training
    patience = 5
    min_improvement = 0.01

Modules, in dependency order: ``base_spec`` (``[experiment.base]``, the stopping rule, the base's config and
digest), ``spec`` (the experiment file and every arm's config), ``metrics`` (forgetting and
stability gap from loss curves), ``results`` (an arm's result.json and the metrics recomputed from it), ``plots``
(``curves.png``), ``base`` (pre-training, exporting and publishing the base), ``report`` (``results.md``,
``results.json``), ``runner`` (arm processes, progress, and
``run_experiment``, which trains what is missing and then writes the report).
"""

from launch.cpt.runner import run_experiment
from launch.cpt.spec import CPT_CONFIG, load_experiment

__all__ = ["CPT_CONFIG", "load_experiment", "run_experiment"]
