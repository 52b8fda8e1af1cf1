"""The command line as the tests run it: ``python -m core ARGS``.

``run_core`` starts it as a user does, in a fresh interpreter (the entry point,
the exit status, everything the process prints). ``call_core`` runs the same
command in this process, for tests about what a command checks and says: no
interpreter and torch import to pay (seconds on these CPUs), and any warning is
an error there, as a stray line on stderr would fail the one-line checks of a
real run. Both give ``returncode``, ``stdout`` and ``stderr``; the ``assert_*``
helpers check the one-line bad-input errors they (and LoraError) give.
"""
import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def core_env() -> dict:
    """The environment a ``python -m core`` child needs to import this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_core(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=core_env(), timeout=timeout)


def call_core(*args) -> SimpleNamespace:
    from core import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exit_:          # argparse's usage errors, as the interpreter would exit
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_names(text: str, path, key, words: str) -> None:
    """A bad-input message: one line naming the file, the key (``"*"``: some key;
    None: none asked) and holding ``words``."""
    assert "\n" not in text.strip() and str(path) in text and words in text, text
    if key == "*":
        assert "key '" in text
    elif key:
        assert f"key '{key}'" in text


def assert_line_per_file(run, cases: dict) -> None:
    """One run over bad files (``cases``: label -> (path, key, words)): exit status 2,
    no traceback, one ``error: …`` line a file on stderr, in order, naming it."""
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all(line.startswith("error: ") for line in lines), run.stderr
    for line, (path, key, words) in zip(lines, cases.values()):
        assert_names(line, path, key, words)


def assert_one_line_error(run, *words) -> str:
    """Exit status 2, no traceback, exactly one line on stderr (``error: …``) holding every word."""
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]
