"""Grading: `aurora-lite lab grade N [--tree DIR] [--json] [-k EXPR]`.

Runs lab N's tests (labs/labN_*/test_labN.py of the INSTALLED aurora-lite: the tests a
student's tree is graded by cannot be edited in that tree) in a fresh ``python -m pytest``
subprocess whose imports come from the tree: its working directory is the tree and the
tree is first on PYTHONPATH, so the tests, and every process they start (storage nodes,
writer, replica: ``python -m engine.cli ...``), run the tree's code. Without a tree the
installed reference is graded (it must score 100).

Verdicts come from pytest's JUnit XML. A test marked ``given`` passes on the skeleton too
and does not count; the score is the share of the other tests that passed, 0-100. A test
that prints ``seed=N`` (randomised tests do) gets its seed and the command that replays it.

The lab's environment (``Lab.env``; lab 3 sets AURORA_LITE_PURE_PYTHON=1) is set for the
run, so the processes it starts use the student's pure-Python materialiser too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

from labs import registry

LABS_DIR = registry.LABS_DIR
PYTEST_INI = os.path.join(LABS_DIR, "pytest.ini")
SEED_RE = re.compile(r"seed=(\d+)")
#: One lab's grade, real processes included, stays under 5 minutes (issue 19); the run is
#: stopped past this.
GRADE_TIMEOUT_S = 600.0


@dataclass
class TestVerdict:
    name: str            # the test function's name (with its parameters)
    module: str          # e.g. lab1_quorum.test_lab1
    outcome: str         # passed | failed | error | skipped
    given: bool          # passes on the skeleton too; not scored
    processes: bool      # runs real processes
    seconds: float
    message: str = ""    # first line of the failure
    seed: int | None = None
    replay: str = ""     # the command that reruns this test with its seed


def _marker_sets(xml_root) -> dict[str, set[str]]:
    """{test name: markers} from the properties the labs' conftest records."""
    out: dict[str, set[str]] = {}
    for case in xml_root.iter("testcase"):
        marks = set()
        for prop in case.iter("property"):
            if prop.get("name") == "lab_markers":
                marks |= set(filter(None, (prop.get("value") or "").split(",")))
        out[case.get("name")] = marks
    return out


def parse_junit(path: str, lab: int, tree: str | None) -> list[TestVerdict]:
    root = ET.parse(path).getroot()
    marks = _marker_sets(root)
    verdicts = []
    for case in root.iter("testcase"):
        name = case.get("name")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        out_text = "".join((n.text or "") for n in case.iter("system-out"))
        match = SEED_RE.search(out_text)
        seed = int(match.group(1)) if match else None
        replay = ""
        if seed is not None and outcome in ("failed", "error"):
            where = f" --tree {tree}" if tree else ""
            replay = f"AURORA_TEST_SEED={seed} aurora-lite lab grade {lab}{where} -k '{name}'"
        verdicts.append(TestVerdict(name=name, module=case.get("classname") or "", outcome=outcome, given="given" in marks.get(name, ()),
                                    processes="processes" in marks.get(name, ()),
                                    seconds=float(case.get("time") or 0.0), message=message,
                                    seed=seed, replay=replay))
    return verdicts


def score_of(verdicts: list[TestVerdict]) -> int:
    scored = [v for v in verdicts if not v.given and v.outcome != "skipped"]
    if not scored:
        return 0
    return round(100 * sum(v.outcome == "passed" for v in scored) / len(scored))


def run_pytest(test_files: list[str], tree: str | None, *, keyword: str | None = None,
               markexpr: str | None = None, env: dict | None = None,
               timeout_s: float = GRADE_TIMEOUT_S) -> tuple[str, subprocess.CompletedProcess]:
    """Run pytest on test_files against tree (None: the installed reference). Returns the
    JUnit XML path (in a fresh temp dir the caller may delete) and the completed process."""
    out_dir = tempfile.mkdtemp(prefix="aurora-lab-grade-")
    xml = os.path.join(out_dir, "junit.xml")
    run_env = dict(os.environ)
    run_env.update(env or {})
    # The tree's code first, for the tests and every process they start.
    if tree:
        tree = os.path.abspath(tree)
        run_env["PYTHONPATH"] = os.pathsep.join([tree] + [p for p in run_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    run_env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-c", PYTEST_INI, "--rootdir", LABS_DIR,
           "--import-mode=importlib", "-p", "no:cacheprovider", "-q", "--junitxml", xml,
           "-o", "junit_logging=system-out", "-o", "junit_family=xunit1", *test_files]
    if keyword:
        cmd += ["-k", keyword]
    if markexpr:
        cmd += ["-m", markexpr]
    try:
        proc = subprocess.run(cmd, cwd=tree or out_dir, env=run_env, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        # pytest's own per-test timeout (labs/pytest.ini) should have fired first.
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        proc = subprocess.CompletedProcess(cmd, -1, partial, f"grading stopped after {timeout_s:.0f}s")
    return xml, proc


def grade(lab_number: int, tree: str | None = None, *, keyword: str | None = None,
          markexpr: str | None = None) -> dict:
    """Grade lab ``lab_number`` against ``tree`` (None: the installed reference).

    Returns {"lab", "title", "tree", "score", "seconds", "tests": [TestVerdict as dict],
    "pytest_exit", "output" (pytest's own text, for failures outside any test)}."""
    lab = registry.get(lab_number)
    if tree is not None and not os.path.isdir(tree):
        raise FileNotFoundError(f"--tree {tree}: no such directory (make one with "
                                f"`aurora-lite lab make {lab_number} --out DIR`)")
    tree = os.path.abspath(tree) if tree else None
    started = time.monotonic()
    xml, proc = run_pytest([lab.test_file], tree, keyword=keyword, markexpr=markexpr, env=lab.env)
    try:
        verdicts = parse_junit(xml, lab.number, tree) if os.path.exists(xml) else []
    finally:
        shutil.rmtree(os.path.dirname(xml), ignore_errors=True)   # run_pytest's temp dir
    return {
        "lab": lab.number, "title": lab.title,
        "tree": os.path.abspath(tree) if tree else None,
        "score": score_of(verdicts), "seconds": round(time.monotonic() - started, 1),
        "tests": [asdict(v) for v in verdicts],
        "pytest_exit": proc.returncode,
        "output": "" if verdicts else (proc.stdout + proc.stderr)[-4000:],
    }
