"""Writing a student tree: `aurora-lite lab make N --out DIR`.

The tree is a copy of the project as installed (engine/, storage_node/, labs/, the
generated aurora_pb/, setup.py, pyproject.toml, proto/, README.md) in which every block
marked ``# BEGIN LAB N`` / ``# END LAB N`` is replaced by ``raise NotImplementedError``
(labs/markers.py). Everything else is the reference implementation.

Building: the tree's setup.py builds the protobuf modules and the Cython materialiser like
the project's (``pip install -e DIR``). So that a tree runs at once without a build, the
reference's already built outputs are copied in too: the generated aurora_pb/ and the
compiled engine/format/_materialise_cy*.so (its source, the .pyx, has no lab blocks; lab 3
grades the pure-Python twin). The copy takes well under a second; nothing is compiled.

Where the project files come from: a source checkout or an editable install (the folder
above labs/ holds setup.py), or, after a plain ``pip install .``, the copies setup.py put
into the package as labs/_project/.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil

from labs import registry
from labs.markers import find_blocks, skeleton_source

log = logging.getLogger(__name__)

PACKAGES = ("engine", "storage_node", "labs", "aurora_pb")
#: The project files a tree needs besides the packages (setup.py builds from them).
ROOT_FILES = ("setup.py", "pyproject.toml", "README.md")
ROOT_DIRS = ("proto",)
#: Marked code lives only in these packages.
MARKED_PACKAGES = ("engine", "storage_node")
TREE_INFO = ".aurora-lab.json"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.c", "_project", "*.egg-info")


class TreeError(Exception):
    """The tree cannot be written (target not empty, project files missing)."""


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TreeError(f"package {name!r} is not importable; is aurora-lite installed?")
    return list(spec.submodule_search_locations)[0]


def project_files_dir() -> str:
    """Where setup.py, pyproject.toml, README.md and proto/ are (see the module doc)."""
    labs_dir = package_dir("labs")
    checkout = os.path.dirname(labs_dir)
    if os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isdir(os.path.join(checkout, "proto")):
        return checkout
    shipped = os.path.join(labs_dir, "_project")
    if os.path.isfile(os.path.join(shipped, "setup.py")):
        return shipped
    raise TreeError(f"cannot find the project's setup.py and proto/ (looked in {checkout} and "
                    f"{shipped}); reinstall aurora-lite with `pip install .`")


def marked_files(root: str) -> list[str]:
    """Paths (relative to root) of the modules of MARKED_PACKAGES under root."""
    out = []
    for package in MARKED_PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    return sorted(out)


def blocks_by_lab(root: str | None = None) -> dict[int, list[tuple[str, int]]]:
    """{lab: [(file, BEGIN line), ...]} of the reference code (root: the installed packages)."""
    out: dict[int, list[tuple[str, int]]] = {}
    if root is None:
        root = os.path.dirname(package_dir("engine"))
    for rel in marked_files(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for block in find_blocks(f.read(), rel):
                out.setdefault(block.lab, []).append((rel, block.begin_line))
    return out


def make_tree(lab_number: int, out_dir: str) -> dict:
    """Write the student tree of lab ``lab_number`` into ``out_dir`` (new or empty).

    Returns {"lab", "out", "blocks": [file, ...] (one entry per block cut)}."""
    lab = registry.get(lab_number)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise TreeError(f"{out_dir} exists and is not an empty directory; choose a new --out "
                        f"(nothing was written)")
    project = project_files_dir()
    sources = {name: package_dir(name) for name in PACKAGES}
    os.makedirs(out_dir, exist_ok=True)
    for name, src in sources.items():
        shutil.copytree(src, os.path.join(out_dir, name), ignore=IGNORE)
    for name in ROOT_FILES:
        shutil.copy2(os.path.join(project, name), os.path.join(out_dir, name))
    for name in ROOT_DIRS:
        shutil.copytree(os.path.join(project, name), os.path.join(out_dir, name), ignore=IGNORE)
    cut: list[str] = []
    for rel in marked_files(out_dir):
        path = os.path.join(out_dir, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new_text, n = skeleton_source(text, lab.number, rel)
        if n:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new_text)
            cut += [rel] * n
    if not cut:
        raise TreeError(f"lab {lab.number}: no '# BEGIN LAB {lab.number}' block found in the code")
    with open(os.path.join(out_dir, TREE_INFO), "w") as f:
        json.dump({"lab": lab.number, "title": lab.title, "blocks": cut}, f, indent=1)
    log.debug("lab %d tree in %s: %d blocks cut from %s", lab.number, out_dir, len(cut),
             sorted(set(cut)))
    return {"lab": lab.number, "out": out_dir, "blocks": cut}
