"""The project's own promises: CI runs the README's test command; metadata."""
import fnmatch
import pathlib
import re

import pytest

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


# CPython versions with a torch wheel on PyPI, by the exact pin of the extras. Probed
# 2026-12-01 for 3.9 to 3.15 with `pip index versions torch --python-version 3.X
# --only-binary=:all: --platform manylinux_2_28_x86_64`: 2.13.0 is listed for 3.10 to
# 3.14; 3.9 ends at 2.8.0 and 3.15 starts at 2.15.0. Re-probe when the pin moves.
TORCH_WHEEL_PYTHONS = {"2.13.0": ["3.10", "3.11", "3.12", "3.13", "3.14"]}


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _allowed_pythons(spec):
    from packaging.specifiers import SpecifierSet
    s = SpecifierSet(spec)
    return [f"3.{m}" for m in range(0, 40) if s.contains(f"3.{m}.0") and s.contains(f"3.{m}.99")]


def test_requires_python_matches_what_the_torch_pin_can_install():
    meta = _pyproject()["project"]
    pins = {req.replace(" ", "") for reqs in meta["optional-dependencies"].values()
            for req in reqs if re.match(r"torch\b", req)}
    assert len(pins) == 1, f"one torch pin for every extra, not {sorted(pins)}"
    version = pins.pop().split("==", 1)[1]
    assert version in TORCH_WHEEL_PYTHONS, (
        f"torch=={version}: probe which Pythons PyPI has wheels for and record them above")
    allowed = _allowed_pythons(meta["requires-python"])
    assert allowed == TORCH_WHEEL_PYTHONS[version]
    classified = [c.rsplit(" :: ", 1)[1] for c in meta["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert sorted(classified, key=lambda v: int(v.split(".")[1])) == allowed
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert f"Python {allowed[0]}–{allowed[-1]}" in setup
    assert f"`{meta['requires-python']}`" in setup


def test_every_subpackage_is_packaged():
    """A plain (non-editable) install must carry dhsa.harness, dhsa.patching, ..."""
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    packages = [p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                for p in (ROOT / "dhsa").rglob("__init__.py")]
    assert "dhsa" in packages
    for pkg in packages:
        assert any(fnmatch.fnmatchcase(pkg, pat) for pat in find["include"]), pkg
