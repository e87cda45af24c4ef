"""The study's ``report.md``: its tables, with the contact sheets and confusion matrices copied next to it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from synfer_ray.config import StudyConfig
from synfer_ray.train.generator_report import class_scales_text, curve_name, point_name, sweep_table

CONDITION_TITLES = {"text": "(a) text only", "text_au": "(b) text + AU", "text_au_sg": "(c) text + AU + SG",
                    "text_au_sg_labeler": "(d) text + AU + SG + labeler"}


def _cell(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


SYNTHETIC_ROWS = {"accepted": "only those the labeler accepted, so fewer than asked where acceptance is low",
                  "all": "every generated row with its rectified label"}


def recall_lines(results: dict, classes: Sequence[str]) -> list[str]:
    """Per-class recall on the real test faces: a class a model misses on real faces it cannot
    score (evaluator) or vote for (guide, labeler) on generated ones."""
    models = [(role, (info or {}).get("test") or {}) for role, info in (
        ("guide", results["classifiers"]["guide"]), ("evaluator", results["classifiers"]["evaluator"]),
        ("labeler", results.get("labeler")))]
    models = [(role, test["recall"]) for role, test in models if test.get("recall")]
    if not models:
        return []
    return ["", "Recall per class on the real test faces (%):", "", "| model | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes)] + [
        f"| {role} | " + " | ".join(_cell([recall.get(c)]) for c in classes) + " |" for role, recall in models]


def budget_rows(results: dict) -> list[str]:
    """One table line per model upstream of the downstream ones: the real rows it learnt from."""
    from synfer_ray.bundle import BundleManifest
    lines = []
    for role, info in (("guide", results["classifiers"]["guide"]), ("evaluator", results["classifiers"]["evaluator"])):
        how = f"data part {info['parts']}" if info.get("parts") else "taken as given (its own training record)"
        lines.append(f"| {role} | {info.get('train_rows', 'n/a')} | {how} |")
    training = BundleManifest.read(Path(results["generator"]["bundle"])).training
    if training is None:
        lines.append("| generator | 0 | random or imported weights: no training record |")
    else:
        data = training.get("data") or {}
        counts = data.get("class_counts") or {}
        steps = len(training.get("steps", []))
        lines.append(f"| generator | {round(sum(counts.values())) if counts else 'not recorded'} | "
                     f"{data.get('path', 'not recorded')}" + (f", then {steps} further training step(s)"
                                                                if steps else "") + " |")
    labeler = results.get("labeler")
    if labeler:
        lines.append(f"| labeler (FERAnno) | {labeler.get('train_rows', 'n/a')} | over the generator's frozen UNet |")
    return lines


def _downstream_budget(run: dict, real_train: str) -> tuple[Any, Any]:
    """(real rows, synthetic rows) a downstream model trained on, from its per-source row counts."""
    sources = run.get("source_rows")
    if not sources:
        return "n/a", "n/a"
    real = sum(s["rows"] for s in sources if s["path"] == real_train)
    return real, sum(s["rows"] for s in sources) - real


def headline_lines(results: dict) -> list[str]:
    """The paper's headline claim: every real row vs every real row plus accepted synthetic rows."""
    runs = results["downstream"]
    if "all real" not in runs or "all real + synthetic" not in runs:
        return []
    real = [r["test"]["accuracy"] for r in runs["all real"]]
    mixed = [r["test"]["accuracy"] for r in runs["all real + synthetic"]]
    gap = np.mean(mixed) - np.mean(real)
    spread = max(np.std(real), np.std(mixed))
    verdict = ("a gain larger than the seeds' spread" if gap > spread else
               "no gain beyond the seeds' spread" if gap > -spread else "a loss larger than the seeds' spread")
    lines = ["", "## The headline claim: all real rows, with and without synthetic rows", "",
             f"Test accuracy over {len(real)} seed(s): all real {_cell(real)}, all real + synthetic {_cell(mixed)}; "
             f"gap {100 * gap:+.1f} points against a spread (std) of {100 * spread:.1f}: {verdict}."]
    made = results.get("headline_synthetic") or {}
    targets = made.get("accepted_targets")
    if targets:
        lines += ["", f"The synthetic set: {made['rows']} rows made for "
                      f"{sum(targets['wanted'].values())} accepted ({targets['stopped']}; budget {targets['budget']} "
                      "rows). Accepted rows per class, by final label:", "",
                  *_one_row_table({c: f"{targets['accepted'][c]} of {n}" for c, n in targets["wanted"].items()})]
    elif made.get("accepted_by_label"):
        accepted = made["accepted_by_label"]
        lines += ["", f"The synthetic set: {made['rows']} rows made, equally many asked of each class; the "
                      f"labelers accepted {sum(accepted.values())} ({sum(accepted.values()) / made['rows']:.1%}), "
                      "all of which the model adds. Accepted rows per class, by final label:", "",
                  *_one_row_table(accepted)]
    return lines


def _one_row_table(cells: dict) -> list[str]:
    """A Markdown table of one row, a column per key."""
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells),
            "| " + " | ".join(str(v) for v in cells.values()) + " |"]


def vote_lines(votes: dict[str, dict], tau: float) -> list[str]:
    """The labelers' vote on real faces: does the labeler's vote add to the guide's?"""
    if not votes:
        return []
    lines = ["", "The vote that labels generated rows (the weighted mean of the voters' probabilities), on the "
             f"real test faces: its label's accuracy, and the rows it accepts at tau {tau} with the share of "
             "them labelled right.", "", "| vote | accuracy | UAR | accepted | right among accepted |",
             "|---|---|---|---|---|"]
    return lines + [f"| {name} | {_cell([v.get('accuracy')])} | {_cell([v.get('uar')])} | "
                    f"{_cell([v.get('acceptance')])} | {_cell([v.get('accepted_accuracy')])} |"
                    for name, v in votes.items()]


def stage_time_lines(times: Sequence[dict]) -> list[str]:
    """Wall time of each stage, from the run that made it (a cached stage keeps its first time); a
    stage stopped and continued, the sum of its parts (stages made before parts were counted: the last)."""
    if not times:
        return []
    lines = ["", "## Stage times", "", f"Wall time that made each stage (under `stages/`); a stage stopped and "
             f"continued: the sum of its parts, a stopped part counted to the last file it wrote (parts: "
             f"blank for stages made before they were counted, which record only their last part); "
             f"{sum(t['seconds'] for t in times) / 3600:.1f} h in all.", "", "| stage | minutes | parts |",
             "|---|---|---|"]
    return lines + [f"| `{t['stage']}` | {t['seconds'] / 60:.1f} | {t.get('parts') or ''} |" for t in times]


def sweep_lines(results: dict, classes: Sequence[str], directory: Path,
                setting: tuple[str, float] | None = None) -> list[str]:
    """The SG sweep's table, with each point's contact sheet copied next to the report; ``setting``
    (curve, scale): the study's own, where the weak classes are read (default: the sweep's pick)."""
    sweep = results.get("sweep")
    if not sweep:
        return []
    sheets = []
    for point in sweep["points"]:
        name = f"sweep_{point_name(point)}.png"
        source = Path(sweep["directory"]) / point["contact_sheet"]
        if source.is_file():
            shutil.copy(source, directory / name)
            sheets.append(f"`{name}`")
    return ["", "## SG sweep (the evaluator's agreement with the asked class, %)", "",
            "The study's sampling and seeds at each SG target, step rule and scale (percent of the norm of what "
            "SG steers; adaptive: each face's step times 1 - p(target)), the same images per class at every "
            "point. Diversity: the mean within-class cosine distance of the evaluator's embeddings (0 = all "
            "alike), which the default rule reads; among agreed: the same over the faces the evaluator reads "
            "as asked; pixels: the same over mean-centred grey pixels (class-blind: identity, pose, light). "
            "Real faces: the same readings of as many real test faces per class, a seeded draw.", "",
            sweep_table(sweep, classes, setting).rstrip("\n"), "",
            "Contact sheets: " + ", ".join(sheets) + "."]


def study_sg_point(sampling) -> tuple[str, float] | None:
    """The study's SG setting (a SamplingConfig) as a sweep curve and scale, where the report reads
    which classes stay weak."""
    if not sampling.sg_scale:
        return None
    return curve_name({"sg_target": sampling.sg_target, "sg_adaptive": sampling.sg_adaptive}), sampling.sg_scale


def _under_output(study: StudyConfig, path: str) -> str:
    """A stage's path as the report shows it: relative to the study's output, so that the report reads
    the same wherever the study ran; paths outside it (a given model) are shown whole."""
    try:
        return str(Path(path).resolve().relative_to(Path(study.output).resolve()))
    except ValueError:
        return path


def write_report(study: StudyConfig, results: dict, classes: Sequence[str], directory: Path,
                 complete: bool = True) -> Path:
    """``report.md`` and its pictures; ``complete=False`` while stages are still to come."""
    directory.mkdir(parents=True, exist_ok=True)
    sampling = study.generation.sampling
    class_scales = f", class scales {class_scales_text(sampling.sg_class_scales)}" if sampling.sg_class_scales else ""
    guide, evaluator = results["classifiers"]["guide"], results["classifiers"]["evaluator"]
    lines = [f"# {study.name}: SynFER's claims on real faces", "",
             *([] if complete else ["**In progress**: this report is rewritten as each stage finishes; tables "
                                    "without rows are still to come.", ""]),
             f"Real train `{study.real_train}`, real test `{study.real_test}`. "
             f"{study.generation.per_class} images per class and condition, the same seeds, prompts and AUs in "
             f"every condition; sampling {study.generation.sampling.steps} {study.generation.sampling.scheduler} steps, CFG "
             f"{study.generation.sampling.cfg_scale}, SG scale {study.generation.sampling.sg_scale} on "
             f"{study.generation.sampling.sg_target}"
             f"{class_scales}"
             f"{' (adaptive: times 1 - p(target))' if study.generation.sampling.sg_adaptive else ''}, window "
             f"{study.generation.sampling.sg_window}; labeler tau {study.generation.tau}"
             f"{', each voter reading a face and its mirror image' if study.generation.mirror_average else ''}.", "",
             "## The classifiers", "",
             "| role | model | architecture | seed | data part | test accuracy | UAR |", "|---|---|---|---|---|---|---|"]
    for role, info in (("guide (SG, votes)", guide), ("evaluator (scores only)", evaluator)):
        test = info.get("test") or {}
        lines.append(f"| {role} | `{_under_output(study, info['model'])}` | {info.get('arch') or info.get('model_type')} | "
                     f"{info.get('seed')} | {info.get('parts')} | {_cell([test.get('accuracy')])} | "
                     f"{_cell([test.get('uar')])} |")
    labeler_test = (results.get("labeler") or {}).get("test")
    if labeler_test:
        lines.append(f"| labeler (votes with the guide) | `{_under_output(study, results['labeler']['bundle'])}` | feranno | | all | "
                     f"{_cell([labeler_test.get('accuracy')])} | {_cell([labeler_test.get('uar')])} |")
    lines += recall_lines(results, classes)
    lines += vote_lines(results.get("votes") or {}, study.generation.tau)
    lines += ["", "## Real-data budget", "", "Real faces every model learnt from (rows of "
              f"`{Path(study.real_train).name}`; the downstream models' are in their table below).", "",
              "| model | real rows it learnt from | how |", "|---|---|---|"]
    lines += budget_rows(results)
    lines += ["", "## Generation quality (the evaluator's view, %)", "",
              "| condition | FER accuracy | acceptance | final label = target | final label = evaluator | "
              "accepted: label = evaluator | evaluator confidence | diversity |", "|---|---|---|---|---|---|---|---|"]
    for condition, scores in results["conditions"].items():
        lines.append(f"| {CONDITION_TITLES[condition]} | {_cell([scores['fer_accuracy']])} | "
                     f"{_cell([scores['acceptance']])} | {_cell([scores['label_matches_target']])} | "
                     f"{_cell([scores['label_agrees_with_evaluator']])} | "
                     f"{_cell([scores['accepted_label_agrees_with_evaluator']])} | "
                     f"{_cell([scores['evaluator_confidence']])} | {scores['diversity']:.3f} |")
    lines += ["", "FER accuracy per class (%):", "", "| condition | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for condition, scores in results["conditions"].items():
        per_class = scores["fer_accuracy_per_class"]
        lines.append(f"| {CONDITION_TITLES[condition]} | " + " | ".join(_cell([per_class.get(c)]) for c in classes)
                     + " |")
        source = Path(scores["dataset"]) / "report" / "contact_sheet.png"
        if source.is_file():
            shutil.copy(source, directory / f"contact_{condition}.png")
    lines += sweep_lines(results, classes, directory, study_sg_point(study.generation.sampling))
    lines += ["", "## Downstream: a classifier trained on each set, tested on real faces (%)", "",
              f"Real subset N = {study.downstream.real_rows}; synthetic = condition "
              f"{CONDITION_TITLES[study.downstream.condition]} ({study.downstream.synthetic_rows} rows: "
              f"{SYNTHETIC_ROWS[study.downstream.synthetic_rows]}), the first rows of "
              f"{'the headline set' if results.get('headline_synthetic') else 'a set of rows made for the largest multiple'}"
              f"; seeds {study.downstream.seeds}; "
              f"chance = {100 / len(classes):.1f}. Every model picks its best epoch on held-out real validation "
              f"rows of real train (never synthetic rows) and trains on none of them; each seed draws its own "
              f"split, which every model of that seed shares (validation rows: one count a seed).", "",
              "| training data | real rows | synthetic rows | real validation rows | accuracy | UAR | macro-F1 |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in results["downstream"].items():
        real_rows, synthetic_rows = _downstream_budget(runs[0], study.real_train)
        validation_rows = " / ".join(str(r.get("val_rows", "n/a")) for r in runs)
        lines.append(f"| {name} | {real_rows} | {synthetic_rows} | {validation_rows} | "
                     f"{_cell([r['test']['accuracy'] for r in runs])} | "
                     f"{_cell([r['test']['uar'] for r in runs])} | {_cell([r['test']['macro_f1'] for r in runs])} |")
        confusion = Path(runs[0]["eval"]) / "confusion_matrix.png"
        if confusion.is_file():
            shutil.copy(confusion, directory / f"confusion_{name.replace(' ', '_').replace('+', 'plus')}.png")
    lines += headline_lines(results)
    lines += stage_time_lines(results.get("stage_times", []))
    lines += ["", "Contact sheets: " + ", ".join(f"`contact_{c}.png`" for c in results["conditions"]) + "; "
              "confusion matrices: `confusion_*.png`.", ""]
    report = directory / "report.md"
    report.write_text("\n".join(lines))
    return report
