"""Nothing a user passes to launch/submit.py can add a command to the sbatch script.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_slurm_script.py

The script of `--dry-run` is run by bash with a stub `srun` that records its arguments: a payload
that escaped its quoting would create a marker file; a quoted one reaches srun as one literal word.
Values written into #SBATCH lines (--partition, --job-name, ...) must be plain SLURM names; --setup
lines are shell by design and are only checked for line breaks.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from dist_cluster.run import slurm

REPO = Path(__file__).resolve().parent.parent
NAME_FIELDS = ("--partition", "--job-name", "--account", "--qos", "--constraint")
BREAKS = ("\n", "\r", "\x1b", "\x00", "\u2028")


def payloads(marker_dir: Path) -> list[str]:
    """Quotes, command substitutions, backticks and `;`, each creating a marker file if executed."""
    mark = lambda name: shlex.quote(str(marker_dir / name))  # noqa: E731
    return [f"it's \"q\" {mark('quote')}", f"$(touch {mark('subst')})", f"`touch {mark('tick')}`",
            f"x; touch {mark('semi')}", f"a'; touch {mark('mixed')}; echo '"]


def dry_run(argv: list[str], capsys) -> str:
    """The sbatch script `launch/submit.py --dry-run` prints (up to its trailing comments)."""
    from launch.submit import main
    assert main(["--config", str(REPO / "configs" / "smoke.yaml"), "--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    return out[:out.index("\n# job:")]


def run_script(script: str, tmp_path: Path) -> list[str]:
    """Run `script` with bash, `srun` replaced by a stub; returns the arguments srun received."""
    stub_dir, argv_file = tmp_path / "stub", tmp_path / "srun.argv"
    stub_dir.mkdir(exist_ok=True)
    (stub_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(argv_file))}\n")
    (stub_dir / "srun").chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": f"{stub_dir}:/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 0, done.stderr
    return argv_file.read_text().split("\0")[:-1]


def commands(script: str) -> list[str]:
    """The lines bash executes: neither blank nor comments (#SBATCH lines are comments to bash)."""
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def assert_no_marker(marker_dir: Path) -> None:
    assert not [p.name for p in marker_dir.iterdir()], "a payload was executed"


@pytest.mark.parametrize("index", range(5))
def test_quoted_fields_stay_literal_words(tmp_path, capsys, index):
    """run_dir (the log folder), --folder and --srun-arg: accepted, quoted, never executed."""
    markers = tmp_path / "markers"
    markers.mkdir()
    payload = payloads(markers)[index]
    run_dir, folder = tmp_path / f"run {payload}", tmp_path / f"logs {payload}"
    cases = {"run_dir": ([f"run_dir={run_dir}"], f"{run_dir}/submitit/%j"),
             "--folder": ([f"run_dir={tmp_path / 'r'}", "--folder", str(folder)], str(folder)),
             "--srun-arg": ([f"run_dir={tmp_path / 'r'}", f"--srun-arg=--comment={payload}"], f"--comment={payload}")}
    for field, (argv, literal) in cases.items():
        script = dry_run(argv, capsys)
        assert len(commands(script)) == 2, f"{field}: extra command in\n{script}"  # export + srun
        srun_argv = run_script(script, tmp_path)
        assert literal in srun_argv, f"{field}: {literal!r} not one word of srun's {srun_argv}"
        assert_no_marker(markers)
    assert not run_dir.exists(), "a dry run must not create anything"


@pytest.mark.parametrize("index", range(5))
def test_python_command_words_are_quoted(tmp_path, capsys, index):
    """--python is a command (`singularity exec img python`): its words reach srun, its shell does not."""
    markers = tmp_path / "markers"
    markers.mkdir()
    python = f"python {payloads(markers)[index]}"
    argv = [f"run_dir={tmp_path / 'r'}", "--python", python]
    try:
        words = shlex.split(python)
    except ValueError:  # unbalanced quotes: refused, not guessed
        with pytest.raises(SystemExit, match="--python"):
            dry_run(argv, capsys)
        return
    script = dry_run(argv, capsys)
    assert len(commands(script)) == 2, script
    srun_argv = run_script(script, tmp_path)
    start = srun_argv.index("python")
    assert srun_argv[start:start + len(words)] == words
    assert_no_marker(markers)


@pytest.mark.parametrize("field", NAME_FIELDS)
def test_sbatch_line_values_must_be_slurm_names(tmp_path, capsys, field):
    for payload in payloads(tmp_path):
        with pytest.raises(SystemExit, match=f"{field} .*only letters, digits"):
            dry_run([f"run_dir={tmp_path}", field, payload], capsys)
    good = {"--constraint": "volta32gb&(ib|eth)"}.get(field, "learn-fair_2")
    script = dry_run([f"run_dir={tmp_path}", field, good], capsys)
    assert f"#SBATCH {'--job-name' if field == '--job-name' else field}={shlex.quote(good)}" in script
    assert len(commands(script)) == 2


@pytest.mark.parametrize("field", [*NAME_FIELDS, "--folder", "--setup", "--srun-arg", "--python"])
def test_line_breaks_and_control_characters_are_refused(tmp_path, capsys, field):
    for char in BREAKS:
        with pytest.raises(SystemExit, match=f"{field} .*control character"):
            dry_run([f"run_dir={tmp_path / 'r'}", field, f"ok{char}touch {tmp_path / 'pwned'}"], capsys)
    assert not (tmp_path / "pwned").exists()


def test_run_dir_from_a_yaml_config_with_a_line_break_is_refused(tmp_path):
    """The issue's case: run_dir (the default log folder) from a YAML file."""
    from launch.submit import main
    for char in BREAKS:
        config = tmp_path / "evil.yaml"
        run_dir = json.dumps(f"runs/x{char}touch {tmp_path / 'pwned'}")  # JSON: a YAML double-quoted string
        config.write_text(f"data:\n  num_workers: 1\nrun_dir: {run_dir}\n")
        with pytest.raises(SystemExit, match="run_dir .*control character"):
            main(["--config", str(config), "--dry-run"])
    assert not (tmp_path / "pwned").exists()


def test_setup_lines_are_written_as_given(tmp_path, capsys):
    """--setup is the user's own shell line (module load, source): kept verbatim, one line each."""
    script = dry_run([f"run_dir={tmp_path}", "--setup", "export A=$(echo 1); B=2", "--setup", "C=3"], capsys)
    assert commands(script)[:2] == ["export A=$(echo 1); B=2", "C=3"] and len(commands(script)) == 4


def test_python_api_checks_what_bypasses_the_cli(tmp_path):
    with pytest.raises(ValueError, match="--partition"):
        slurm.slurm_parameters(partition="dev\ntouch x")
    with pytest.raises(ValueError, match="--qos"):
        slurm.render_sbatch(tmp_path, {"slurm_qos": "high;id"})
    with pytest.raises(ValueError, match="--folder"):
        slurm.render_sbatch(f"{tmp_path}\nid", slurm.slurm_parameters())
    with pytest.raises(ValueError, match="--python"):
        slurm.python_command("python 'unclosed")
    assert slurm.python_command("singularity exec a.sif python") == "singularity exec a.sif python"
    assert slurm.python_command("python; id") == "'python;' id"
