"""`aurora-lite lab list | make N --out DIR | grade N [--tree DIR] [--json] [-k EXPR]`:
the coursework labs (labs/, docs/labs.md).

`list` prints one line per lab (`lab N: title - covers; files: ...`); `make` writes a
student tree with lab N's marked blocks cut out (labs/tree.py); `grade` runs lab N's tests
against a tree, or the installed reference without --tree, prints each test's verdict, the
seed and replay command of a failure, and the score 0-100 (labs/grading.py). With --json,
stdout holds only the JSON object (`lab`, `score`, `tests`, ...). Exit code of `grade`: 0
when the score is 100, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json

from engine.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, guarded


def _lab(number: int):
    from labs import registry

    try:
        return registry.get(number)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), EXIT_USAGE) from None


def cmd_list(args: argparse.Namespace) -> int:
    from labs import registry

    for lab in registry.LABS:
        builds = f"; builds on lab {', '.join(map(str, lab.builds_on))}" if lab.builds_on else ""
        print(f"lab {lab.number}: {lab.title} - {lab.covers}; files: {', '.join(lab.files)}{builds}")
    return EXIT_OK


def cmd_make(args: argparse.Namespace) -> int:
    from labs.tree import TreeError, make_tree

    lab = _lab(args.number)
    try:
        made = make_tree(lab.number, args.out)
    except TreeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    files = sorted(set(made["blocks"]))
    print(f"lab {lab.number} tree written to {made['out']}: {len(made['blocks'])} block(s) to "
          f"implement in {', '.join(files)}")
    print(f"handout: {made['out']}/labs/{lab.name}/README.md")
    print(f"grade it: aurora-lite lab grade {lab.number} --tree {made['out']}")
    return EXIT_OK


def cmd_grade(args: argparse.Namespace) -> int:
    from labs.grading import grade

    lab = _lab(args.number)
    try:
        result = grade(lab.number, args.tree, keyword=args.k)
    except FileNotFoundError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK if result["score"] == 100 else EXIT_FAILED
    where = result["tree"] or "the installed reference"
    print(f"lab {lab.number}: {lab.title} - grading {where}")
    for t in result["tests"]:
        tags = ", ".join(tag for tag, on in (("given", t["given"]), ("real processes", t["processes"])) if on)
        tags = f" [{tags}]" if tags else ""
        print(f"  {t['outcome'].upper():7} {t['name']}{tags} ({t['seconds']:.1f}s)")
        if t["outcome"] in ("failed", "error"):
            if t["message"]:
                print(f"          {t['message']}")
            if t["seed"] is not None:
                print(f"          seed {t['seed']}; replay: {t['replay']}")
    if not result["tests"]:
        print("no test ran; pytest said:")
        print(result["output"])
    scored = [t for t in result["tests"] if not t["given"] and t["outcome"] != "skipped"]
    passed = sum(t["outcome"] == "passed" for t in scored)
    print(f"score: {result['score']}/100 ({passed} of {len(scored)} graded tests passed, "
          f"{result['seconds']:.0f}s)")
    return EXIT_OK if result["score"] == 100 else EXIT_FAILED


def register(sub) -> None:
    p = sub.add_parser("lab", help="coursework labs: list, make a student tree, grade (docs/labs.md)")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    q = lab_sub.add_parser("list", help="one line per lab: what it covers and its files")
    q.set_defaults(func=guarded(cmd_list))

    q = lab_sub.add_parser("make", help="write lab N's student tree (its marked code cut out)")
    q.add_argument("number", type=int, metavar="N")
    q.add_argument("--out", required=True, help="a new or empty directory for the tree")
    q.set_defaults(func=guarded(cmd_make))

    q = lab_sub.add_parser("grade", help="run lab N's tests against a tree and score it")
    q.add_argument("number", type=int, metavar="N")
    q.add_argument("--tree", default=None,
                   help="the student tree (default: grade the installed reference)")
    q.add_argument("--json", action="store_true", help="print only a JSON object: lab, score, tests")
    q.add_argument("-k", default=None, metavar="EXPR", help="only the tests matching EXPR (pytest -k)")
    q.set_defaults(func=guarded(cmd_grade))
