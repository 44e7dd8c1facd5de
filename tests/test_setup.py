"""The set-up works as the README says: from the clone's root, and CI stops at any failing step.

`python -m dhsa` (the README's main job) runs from the clone's root, where Python
puts the source folder dhsa/ first on the import path: that folder must be the
package, extension included, or the demo fails for every new user.
"""
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

import dhsa

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(args, cwd, env=None, timeout=120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_python_m_dhsa_runs_from_the_clone_root():
    """What a new user types after the README's install, from where they typed it."""
    r = _run([sys.executable, "-m", "dhsa", "demo", "--help"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "--budget" in r.stdout


def test_the_root_dhsa_folder_is_the_tested_package():
    """From the root, `import dhsa` finds the source folder, and it must hold the
    extension this suite tests (an editable install builds it there)."""
    code = "import dhsa, os; print(os.path.realpath(dhsa.__file__)); print(os.path.realpath(dhsa._core.__file__))"
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    pkg, core = r.stdout.split()
    assert pathlib.Path(pkg).parent == (ROOT / "dhsa").resolve()
    assert pathlib.Path(core).parent == (ROOT / "dhsa").resolve()
    assert os.path.realpath(dhsa._core.__file__) == core


def test_a_source_folder_without_extension_says_so(tmp_path):
    """A dhsa/ without its compiled extension fails with an ImportError that says
    why and what to do, not with a circular-import error."""
    (tmp_path / "dhsa").mkdir()
    for f in (ROOT / "dhsa").glob("*.py"):
        shutil.copy(f, tmp_path / "dhsa" / f.name)
    # as after a plain `pip install .`: no editable finder that would locate the
    # checkout's extension
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in repr(f).lower()]; import dhsa")
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dhsa is imported from"), r.stderr
    assert "pip install -e ." in last


def _fake_ci(tmp_path, fail=None):
    """.ci/run with the README beside it and stand-ins for pip, pytest and the
    sanitizer script; `fail` names the stand-in that exits 1."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "sanitize.sh").write_text("echo ran:sanitize\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pip", "pytest"):
        p = bin_dir / tool
        p.write_text(textwrap.dedent(f"""\
            #!/usr/bin/env bash
            echo "ran:{tool} $*"
            exit {1 if tool == fail else 0}
            """))
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return _run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env)


def test_ci_passes_when_every_step_passes(tmp_path):
    r = _fake_ci(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ran:pytest -q tests" in r.stdout and "ran:sanitize" in r.stdout


@pytest.mark.parametrize("failing", ["pip", "pytest"])
def test_ci_fails_at_the_first_failing_step(tmp_path, failing):
    """A failed install must fail CI, not skip the tests and pass on the sanitizer run."""
    r = _fake_ci(tmp_path, fail=failing)
    assert r.returncode != 0
    assert "ran:sanitize" not in r.stdout
    if failing == "pip":
        assert "ran:pytest" not in r.stdout
