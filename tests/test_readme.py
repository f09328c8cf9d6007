"""The README's code runs as written, and so does every command it shows, in a fresh shell after the quickstart."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lightning_stiffness import names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICKSTART = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
SCRIPTS = ["bash scripts/demo.sh", "bash scripts/test.sh"]
ACTIVATE = "source .venv/bin/activate"
#: Commands that run long as written get these arguments, which shorten them (each script takes them as documented).
SHORTER = {
    "python examples/digits.py fit --config examples/configs/fc_layers.yaml": (
        "--trainer.max_epochs=1 --trainer.limit_train_batches=3 --model.hidden=[32,16,8] "
        "--trainer.callbacks.init_args.epochs=[0] --trainer.callbacks.init_args.samples_per_class=2"
    ),
    "python examples/reproduce_paper.py": "--epochs 2 --lrs 1e-3 1e-2 --max-examples 300 --samples-per-class 2",
    **dict.fromkeys(
        [
            "WANDB_MODE=offline python examples/digits.py fit --config examples/configs/fc.yaml "
            "--trainer.logger lightning.pytorch.loggers.WandbLogger --trainer.logger.save_dir runs/wandb",
            "MLFLOW_ALLOW_FILE_STORE=true python examples/digits.py fit --config examples/configs/fc.yaml "
            "--trainer.logger lightning.pytorch.loggers.MLFlowLogger --trainer.logger.tracking_uri file:./runs/mlruns",
        ],
        "--trainer.max_epochs=1 --trainer.limit_train_batches=3 --trainer.callbacks.init_args.samples_per_class=2",
    ),
    "python examples/text.py fit --config examples/configs/text.yaml": (
        "--trainer.max_epochs=1 --trainer.limit_train_batches=3 --data.train_size=120 --data.val_size=40"
    ),
}


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[str]:
    """Every command the README shows: the lines of its bash blocks and inline code that starts with a program."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    commands += re.findall(
        r"`((?:python|lightning-stiffness|tensorboard|bash|source|\.venv/bin/[^`\s]+) [^`]*)`", prose
    )
    return list(dict.fromkeys(commands))


COMMANDS = [c for c in readme_commands() if c not in SCRIPTS and c != ACTIVATE]


def program(command: str) -> str:
    """The program a command runs: its first word after the environment settings (`WANDB_MODE=offline python ...`)."""
    return next(word for word in command.split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word))


def test_use_without_lightning_snippet_runs(capsys):
    section = README.split("## Use without Lightning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "within" in capsys.readouterr().out


def test_quickstart_has_exactly_two_commands():
    block = re.search(r"```bash\n(.*?)```", QUICKSTART, flags=re.DOTALL).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == SCRIPTS
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_says_how_to_run_what_follows():
    assert ACTIVATE in QUICKSTART and ".venv/bin/" in QUICKSTART
    assert [c for c in readme_commands() if c.startswith("bash ")] == SCRIPTS  # nothing else is run with scripts
    assert {program(c) for c in COMMANDS} == {"lightning-stiffness", "tensorboard", "python"}


def test_every_logged_tag_is_documented():
    pair, kind, layer = "{pair}", "{kind}", "{layer}"
    for tag in (
        names.class_tag(pair, kind, "within"),
        names.class_tag(pair, kind, "between"),
        names.critical_distance_tag(pair),
        names.class_matrix_tag(pair, kind),
        names.distance_curve_tag(pair),
        names.layer_class_tag(pair, kind, layer, "within"),
        names.by_layer_tag(pair),
        names.critical_distance_tag(pair, layer),
        names.distance_curve_tag(pair, layer),
        names.critical_distance_by_layer_tag(pair),
        names.extrapolated_tag(pair, "{space}"),
        names.interval_tag(names.class_tag(pair, kind, "within"), "low"),
        names.probe_seconds_tag(),
        names.gradient_coherence_tag("{set}"),
        names.gradient_diversity_tag("{set}"),
        *(names.group_tag(pair, kind, side) for side in names.GROUP_SIDES),
        names.dataset_class_tag("within"),
        names.dataset_class_matrix_tag(),
        names.group_matrix_tag(pair, kind),
    ):
        assert f"`{tag}`" in README, tag


# ------------------------------------------------------------------------------ every command, after the quickstart


def _fresh_shell(clone: Path, home: Path, command: str, **kwargs) -> subprocess.Popen:
    """``command`` in a new login-less shell of a newcomer: nothing of this test's environment but a plain PATH."""
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MPLBACKEND": "Agg"}
    return subprocess.Popen(
        ["bash", "-c", f"{ACTIVATE} && {command}"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _run(clone: Path, home: Path, command: str, timeout: float = 600) -> str:
    process = _fresh_shell(clone, home, command)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"`{command}` failed in a fresh shell:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def after_quickstart(tmp_path_factory):
    """A fresh copy of this checkout in which the quickstart has run: `.venv` (this one) and the demo's run.

    `bash scripts/demo.sh` installs into `.venv` (done already: the suite runs in it) and then runs one training
    command, forwarding its arguments; that command is run here, with one epoch instead of five.
    """
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv: run the quickstart (bash scripts/test.sh)")
    clone = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    home = tmp_path_factory.mktemp("home")
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    (training,) = [line for line in demo.splitlines() if line.startswith("python ")]
    assert training.endswith(' "$@"')
    _run(clone, home, training.removesuffix(' "$@"') + " --trainer.max_epochs=1")
    assert sorted((clone / "runs" / "demo" / "lightning_logs").glob(f"version_0/{names.PREFIX}/*.pt"))
    return clone, home


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.startswith("tensorboard ")])
def test_readme_command_runs_in_a_fresh_shell(after_quickstart, command):
    clone, home = after_quickstart
    output = _run(clone, home, f"{command} {SHORTER.get(command, '')}".strip())
    if command.startswith(("lightning-stiffness report", "python -m lightning_stiffness report")):
        assert "report written to stiffness-report/report.md" in output
        assert (clone / "stiffness-report" / "report.md").exists()
    if "--trainer.callbacks.help" in command:
        assert "--trainer.callbacks.samples_per_class" in output
    if "WandbLogger" in command:  # the offline run, with the callback's raw results among its files
        (run,) = (clone / "runs" / "wandb" / "wandb").glob("offline-run-*")
        assert list(run.glob("run-*.wandb")) and list(run.glob(f"files/{names.PREFIX}/*.pt"))
    if "MLFlowLogger" in command:  # the file store's run, with metrics and the raw results as artifacts
        (run,) = [meta.parent for meta in (clone / "runs" / "mlruns").glob("*/*/meta.yaml")]
        assert (run / "metrics" / names.PREFIX).is_dir() and list(run.glob(f"artifacts/{names.PREFIX}/*.pt"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("tensorboard ")])
def test_readme_tensorboard_command_serves(after_quickstart, command):
    clone, home = after_quickstart
    server = _fresh_shell(clone, home, f"exec {command} --port 0", start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "http://" not in seen and server.poll() is None:
            seen += server.stdout.readline()
        assert "http://" in seen, f"`{command}` did not start serving:\n{seen[-4000:]}"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
