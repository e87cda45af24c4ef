"""``synfer study``: SynFER's claims measured on real faces, every stage through the normal jobs.

Stages (each cached under ``stages/<kind>-<hash of its config>/``, so a stopped study continues
and a changed setting reruns only what it touches):

1. two FER classifiers on real faces: the *guide* (semantic guidance, votes) and the *evaluator*
   (scores only), refused when they are not different models;
2. the generator bundle (given, or ``train-generator``), and optionally FERAnno (``train-labeler``);
3. one generated set per condition (text / + AU / + SG / + SG + labeler), equal numbers per class,
   the same seeds, prompts and AUs across conditions, scored by the evaluator;
4. optionally the SG sweep: the evaluator's agreement and diversity at each SG target, step rule
   and scale;
5. downstream: one small classifier trained on real only, synthetic only (multiples of the real
   size) and real + synthetic, per seed, tested on held-out real faces;
6. ``report.md`` with the tables, contact sheets and confusion matrices; MLflow: one parent run,
   every stage a child run.
"""

from synfer_ray.study.report import headline_lines, stage_time_lines, write_report
from synfer_ray.study.run import run_study
from synfer_ray.study.scoring import against_baseline, flat_metrics, score_dataset
from synfer_ray.study.stages import (StageCache, check_independent, condition_config, config_hash, downstream_configs,
                                     headline_generate_config, sweep_key)
from synfer_ray.study.stages import _generate_fields  # noqa: F401  (the tests read stage keys through it)

__all__ = ["StageCache", "against_baseline", "check_independent", "condition_config", "config_hash",
           "downstream_configs", "flat_metrics", "headline_generate_config", "headline_lines", "run_study",
           "score_dataset", "stage_time_lines", "sweep_key", "write_report"]
