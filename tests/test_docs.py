"""The docs say what the code does: every documented `synfer` command, option and config override is
real, every config field is described, user documents carry no development history, and the site
builds strictly."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from synfer_ray.config import JOB_CONFIGS
from synfer_ray.reference import (check_command_line, config_field, config_fields, config_reference, cli_reference,
                                  http_api_reference, synfer_invocations)

ROOT = Path(__file__).resolve().parents[1]
# The documents a user reads: the front page, the site, the cluster guides, the model cards.
USER_DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "cluster").rglob("*.md"),
                    *(ROOT / "models").glob("*/README.md")])
SHELL_BLOCK = re.compile(r"^ *```(?:bash|sh|shell|console)[^\n]*\n(.*?)^ *```", re.S | re.M)


def shell_blocks(path: Path) -> list[tuple[int, str]]:
    """Each fenced shell block of a Markdown file, with the line it starts on (console prompts dropped)."""
    text = path.read_text()
    blocks = []
    for match in SHELL_BLOCK.finditer(text):
        body = "\n".join(line[2:] if line.lstrip().startswith("$ ") else line
                         for line in match.group(1).splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, body))
    return blocks


def test_every_documented_synfer_command_names_real_commands_options_and_config_fields():
    problems, checked = [], 0
    for path in USER_DOCS:
        for line, block in shell_blocks(path):
            for args in synfer_invocations(block):
                checked += 1
                problems += [f"{path.relative_to(ROOT)}:{line}: {problem}" for problem in check_command_line(args)]
    assert checked >= 30, f"only {checked} synfer command lines found in the docs: is the parser reading them?"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block, expected", [
    ("synfer generate --config tiny output=out count=8 sampling.steps=10", []),
    ("synfer train --config c.yaml 'data.train=[{path: a}]' data.train.0.limit=5 optim.lr=0.001", []),
    ("synfer generate --config tiny sampling.sg_class_scales.fear=8 --overwrite", []),
    ("synfer generate-one --bundle b --expression happy --au AU12=0.9 -n 2 --sg-scale 3", []),
    ("ray job submit --working-dir . -- python jobs/generate.py --config c.yaml count=4", []),
    # what a rename leaves behind in the docs: each one is caught and named
    ("synfer generate --config tiny sampling.stepz=10", ["`sampling.stepz` is no field"]),
    ("synfer generate --config tiny --overwritten", ["has no option `--overwritten`"]),
    ("synfer bundle make-smol out", ["no command `synfer bundle make-smol`"]),
    ("python jobs/train.py --config c.yaml optim.learning_rate=1", ["`optim.learning_rate` is no field"]),
    ("cd x && synfer serve --config s.yaml limits.rps=3 # a comment", ["`limits.rps` is no field"]),
])
def test_the_command_checker_catches_renamed_commands_options_and_fields(block, expected):
    problems = [problem for args in synfer_invocations(block) for problem in check_command_line(args)]
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected):
        assert words in problem


def test_override_paths_resolve_through_lists_and_maps():
    generate, train = JOB_CONFIGS["generate"], JOB_CONFIGS["train"]
    assert config_field(generate, "sampling.steps") and config_field(generate, "labeling.voters.0.path")
    assert config_field(generate, "sampling.sg_class_scales.fear")
    assert config_field(train, "data.train.1.ratio") and config_field(train, "data.train")
    assert not config_field(generate, "sampling.steps.x") and not config_field(train, "data.train.x.path")
    assert not config_field(generate, "sampling.sg_class_scales.fear.x")


def test_every_field_of_every_job_config_has_a_description_and_is_in_the_reference():
    page = config_reference()
    undescribed = []
    for job, model in JOB_CONFIGS.items():
        for field in config_fields(model):
            if len(field.description.split()) < 3:
                undescribed.append(f"{job}: {field.path} ({field.model})")
            assert f"| `{field.path}` |" in page, field.path
    assert not undescribed, "fields without a description:\n" + "\n".join(undescribed)
    for name in ("optim.lr", "optim.zero_stage", "scaling.num_workers", "generator.min_actors",
                 "sampling.sg_scale", "max_body_bytes"):
        assert f"`{name}`" in page, name


def test_cli_and_http_references_list_every_command_option_and_route():
    cli = cli_reference()
    for words in ("## `synfer generate`", "## `synfer bundle make-random`", "## `synfer data import`",
                  "`--overwrite`", "`--version`"):
        assert words in cli, words
    http = http_api_reference()
    for words in ("`POST /v1/generate`", "`GET /v1/expressions`", "`GET /healthz`", "### `GenerateRequest`"):
        assert words in http, words


HISTORY = [re.compile(pattern, re.I) for pattern in (
    r"\bsessions? \d+",                       # internal work periods
    r"\b(?:at|commit|since|before|from) `?[0-9a-f]{7,40}\b`?",  # a commit named as history
    r"before these changes|the run before these",
)]


def test_user_documents_name_no_work_period_or_commit_as_history():
    found = []
    for path in [*USER_DOCS, *(ROOT / "configs").glob("*.yaml")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in HISTORY:
                if match := pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines"
    text = "\n".join(lines)
    for words in ("make demo", "make test", "SYNFER_FER2013", "synfer data import", "LICENSE", "CITATION.cff"):
        assert words in text, words
    for name in ("LICENSE", "CITATION.cff", "CHANGELOG.md"):
        assert (ROOT / name).is_file(), name


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="the docs packages are not installed (pip install -e '.[docs]')")
def test_the_docs_site_builds_strictly_without_warnings(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-6000:]
    assert "WARNING -" not in log, log[-6000:]
    home = (tmp_path / "index.html").read_text()
    assert "synfer-ray" in home
    for page in ("reference/config/index.html", "reference/cli/index.html", "reference/http-api/index.html",
                 "reference/formats/index.html", "reference/openapi.json"):
        assert (tmp_path / page).is_file(), page
