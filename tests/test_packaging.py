"""Packaging: pyproject.toml agrees with the requirements files, and the `afnext` console script
(afnext/cli.py) reaches every entry point with that entry point's own flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from afnext import cli

ROOT = Path(__file__).resolve().parents[1]

# Flags only that subcommand's own parser has: seeing them in its --help proves the dispatch.
OWN_FLAGS = {
    "serve": ["--think-model", "--upload-quota-gb", "--tts-model", "--replicas", "--max-replicas"],
    "ask": ["--think", "--max-new-tokens", "--dtype"],
    "chat": ["--jsonl", "--no-cache", "--dtype", "--conversation", "--store"],
    "conversations": ["--store", "--json"],
    "voice": ["--input", "--realtime", "--tts-model"],
    "vad": ["--backend", "--hangover-ms"],
    "tts": ["--engine", "--out"],
    "tiny": ["--size", "--seed", "--tts"],
    "bench": ["--durations", "--decode"],
    "desktop": ["--list-devices", "--server", "--input-device"],
}


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_is_tested():
    assert set(OWN_FLAGS) == set(cli.COMMANDS)


@pytest.mark.parametrize("name", list(OWN_FLAGS))
def test_subcommand_help_is_its_entry_points(name, capsys):
    text = _help([name, "--help"], capsys)
    for flag in OWN_FLAGS[name]:
        assert flag in text, f"afnext {name} --help lacks {flag}"


def test_top_level_help_names_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in cli.COMMANDS)


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "usage: afnext" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_tiny_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli.main(["tiny", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert "random-weight tiny" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["serve", "ask", "chat", "voice", "desktop"])
def test_shared_flags_read_the_same_everywhere(name, capsys):
    """--model/--device (and --tts/--tts-model where there is a voice) come from one helper."""
    text = " ".join(_help([name, "--help"], capsys).split())  # argparse wraps to the terminal's width
    assert cli.MODEL_HELP in text and cli.DEVICE_HELP in text
    assert ("--tts {espeak,pocket}" in text) == (name in ("serve", "voice", "desktop"))


def test_shared_flags_keep_their_defaults():
    import app.__main__ as serve
    from app import desktop

    served = serve.parser().parse_args([])
    assert (served.model, served.device, served.tts, served.tts_model) == ("instruct", "auto", "espeak", None)
    local = desktop._parser().parse_args([])
    assert (local.model, local.device, local.tts, local.tts_model) == (cli.DEFAULT_MODEL, "auto", "espeak", None)


def test_the_library_does_not_import_app():
    code = "import sys, afnext.cli; sys.exit(any(m == 'app' or m.startswith('app.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def _requirements(path: Path) -> dict[str, str]:
    """{canonical name: requirement} of a requirements file: comments dropped, `-r` includes skipped."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            found[canonicalize_name(req.name)] = str(req)
    return found


def _by_name(specs: list[str]) -> dict[str, str]:
    return {canonicalize_name(Requirement(s).name): str(Requirement(s)) for s in specs}


def test_pyproject_dependencies_are_the_requirements_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = _by_name(project["dependencies"])
    assert dependencies == _requirements(ROOT / "requirements.txt")
    assert dependencies["torch"] == "torch==2.13.0" and dependencies["transformers"] == "transformers==5.24.0"
    assert _by_name(project["optional-dependencies"]["dev"]) == _requirements(ROOT / "requirements-dev.txt")
    assert _by_name(project["optional-dependencies"]["serve"]) == _requirements(ROOT / "requirements-serve.txt")
    assert "-r requirements-serve.txt" in (ROOT / "requirements-dev.txt").read_text()  # the tests run replicas
    assert project["scripts"] == {"afnext": "afnext.cli:main"}


@pytest.mark.parametrize("module", ["app", "afnext"])
def test_a_missing_torch_says_how_to_set_up(module):
    code = f"import runpy, sys; sys.modules['torch'] = None; runpy.run_module({module!r}, run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch is not installed in this Python" in result.stderr, result.stderr[-800:]
    assert "bash scripts/setup.sh" in result.stderr


@pytest.mark.parametrize("command", ["afnext.vad", "afnext.tiny", "app.desktop", "app"])
def test_a_command_run_outside_the_set_up_is_one_sentence(command, tmp_path):
    """`python -m afnext.X` / `python -m app.X` with a requirement missing: the sentence saying how to set
    up, and no traceback (only `python -m app` and `python -m afnext` said it, after a traceback)."""
    for name in ("torch", "soxr"):  # each stands for a package this Python does not have
        (tmp_path / f"{name}.py").write_text(f"raise ModuleNotFoundError({f'No module named {name!r}'!r}, name={name!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run([sys.executable, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert re.fullmatch(r"(torch|soxr) is not installed in this Python \(.*\); run `bash scripts/setup.sh`.*\n",
                        result.stderr), result.stderr


def test_replicas_without_ray_say_how_to_install_it():
    code = ("import runpy, sys; sys.modules['ray'] = None; sys.argv[0] = 'app'; "
            "runpy.run_module('app', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "--replicas", "2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout[-800:]  # as every start error
    assert result.stderr.strip().splitlines()[-1] == "error: " + INSTALL_SENTENCE, result.stderr[-800:]


INSTALL_SENTENCE = ("--replicas runs the app on Ray Serve, which is not installed; install it with "
                    "`bash scripts/setup.sh requirements-serve.txt` (or `pip install -r requirements-serve.txt`).")
