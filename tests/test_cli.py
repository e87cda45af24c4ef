import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from synfer_ray.cli import app

runner = CliRunner()


def test_console_script_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "synfer_ray.cli", "--help"], capture_output=True, text=True,
                            check=True)
    for command in ("generate-one", "bundle"):
        assert command in result.stdout


def test_generate_one_writes_pngs_with_provenance(tiny_bundle_path, tmp_path):
    out = tmp_path / "look"
    args = ["generate-one", "--bundle", str(tiny_bundle_path), "--expression", "angry", "--au", "AU4=0.9",
            "--seed", "7", "-n", "2", "--steps", "4", "--sg-scale", "2", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["anger_seed7.json", "anger_seed7.png",
                                                     "anger_seed8.json", "anger_seed8.png"]
    assert Image.open(out / "anger_seed7.png").size == (48, 48)
    provenance = json.loads((out / "anger_seed7.json").read_text())
    assert provenance["aus"]["AU4"] == pytest.approx(0.9) and provenance["target"] == "anger"
    first = (out / "anger_seed7.png").read_bytes()
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "anger_seed7.png").read_bytes() == first


@pytest.mark.parametrize("extra, message", [
    (["--expression", "grumpy"], "expression: got 'grumpy'"),
    (["--expression", "happy", "--au", "AU7=0.5"], "--au: got 'AU7'"),
    (["--expression", "happy", "--au", "AU12=1.5"], r"--au.AU12: got 1.5; expected an intensity in [0, 1]"),
    (["--expression", "happy", "--au", "AU12"], "--au: got 'AU12'; expected NAME=VALUE"),
    (["--expression", "happy", "--steps", "0"], "steps: got 0"),
])
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(tiny_bundle_path, tmp_path, extra, message):
    out = tmp_path / "never"
    result = runner.invoke(app, ["generate-one", "--bundle", str(tiny_bundle_path), "--out", str(out), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_missing_bundle_exits_2(tmp_path):
    result = runner.invoke(app, ["generate-one", "--bundle", str(tmp_path / "nope"), "--expression", "happy"])
    assert result.exit_code == 2 and "bundle:" in result.output


def test_bundle_make_tiny_and_info(tmp_path):
    path = tmp_path / "b"
    assert runner.invoke(app, ["bundle", "make-tiny", str(path), "--expressions", "affectnet8"]).exit_code == 0
    result = runner.invoke(app, ["bundle", "info", str(path)])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["intact"] and info["classes"][-1] == "contempt"


def test_version_prints_the_installed_version():
    from importlib.metadata import version
    result = subprocess.run([sys.executable, "-m", "synfer_ray.cli", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f"synfer-ray {version('synfer-ray')}"


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_command_argument_and_option_has_help():
    from synfer_ray.cli import click_command
    missing = [" ".join(path) or "synfer" for path, command in _commands(click_command()) if not command.help]
    missing += [f"{' '.join(path)} {param.name}" for path, command in _commands(click_command())
                for param in command.params if not getattr(param, "help", None)]
    assert not missing


def test_command_configs_name_every_config_command_and_its_job():
    from synfer_ray.cli import COMMAND_CONFIGS, click_command
    from synfer_ray.config import JOB_CONFIGS
    with_config = {" ".join(path) for path, command in _commands(click_command())
                   if any("--config" in getattr(param, "opts", []) for param in command.params)}
    assert set(COMMAND_CONFIGS) == with_config
    assert set(COMMAND_CONFIGS.values()) <= set(JOB_CONFIGS)


def test_every_preset_is_a_valid_config_of_its_command():
    from importlib import resources

    from synfer_ray.cli import COMMAND_CONFIGS, PRESETS
    from synfer_ray.config import JOB_CONFIGS, load_config
    from synfer_ray.presets import preset_path
    shipped = {p.name.removesuffix(".yaml") for p in resources.files("synfer_ray.presets").iterdir()
               if p.name.endswith(".yaml")}
    assert set(PRESETS) == shipped
    for name, command in PRESETS.items():
        load_config(JOB_CONFIGS[COMMAND_CONFIGS[command]], preset_path(name), [])
        assert name in runner.invoke(app, [*command.split(), "--help"], terminal_width=200).output
