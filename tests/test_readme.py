"""The README's code runs as written."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_use_without_lightning_snippet_runs(capsys):
    section = README.split("## Use without Lightning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "within" in capsys.readouterr().out


def test_quickstart_has_exactly_two_commands():
    section = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_every_logged_tag_is_documented():
    for tag in (
        "stiffness/{pair}/{kind}/within_class",
        "stiffness/{pair}/{kind}/between_class",
        "stiffness/{pair}/critical_distance/input",
        "stiffness/{pair}/{kind}/class_matrix",
        "stiffness/{pair}/distance_curve",
        "stiffness/{pair}/{kind}/by_layer/{layer}/within_class",
        "stiffness/{pair}/by_layer",
        "stiffness/{pair}/critical_distance/{layer}",
        "stiffness/{pair}/distance_curve/{layer}",
        "stiffness/{pair}/critical_distance_by_layer",
        "stiffness/probe_seconds",
    ):
        assert f"`{tag}`" in README, tag
