"""The project's own promises: CI runs the README's test command; metadata."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ci_steps():
    """The steps of .ci/run that make up the README's test command, one per line."""
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    marker = [i for i, l in enumerate(lines) if "--- the README's test command" in l]
    assert marker, ".ci/run lost its README test-command marker"
    steps = []
    for line in lines[marker[0] + 1:]:
        if line.startswith("#"):
            break
        steps.append(line)
    return steps


def _ci_command():
    return " && ".join(_ci_steps())


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert _ci_command() in [b.strip() for b in blocks]


def test_readme_has_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(cmds) == 2
    assert "python -m dhsa demo" in cmds[0]
    assert cmds[1].strip() == _ci_command()


def test_license_is_permissive_and_declared():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license = {text = "MIT"}' in (ROOT / "pyproject.toml").read_text()


def test_ci_also_runs_the_sanitizer_build():
    """The ASan + UBSan run is part of CI, after the README's test command."""
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_line = lines.index(_ci_steps()[-1])
    assert "bash scripts/sanitize.sh" in lines[test_line + 1:]
    assert (ROOT / "scripts" / "sanitize.sh").exists()
