"""The README's two commands are exactly the ones CI runs (in a fresh virtual environment with an empty HOME)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The one-line bash blocks of the README's quick start, in order."""
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.startswith('echo "== README command')]


def test_ci_runs_the_readme_commands_verbatim():
    readme = readme_commands()
    assert len(readme) == 2 and all("\n" not in c for c in readme)
    assert ci_commands() == readme


def test_ci_uses_a_fresh_environment_and_empty_home():
    script = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and 'export HOME="$work/home"' in script and "set -euo pipefail" in script
