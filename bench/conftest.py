"""Benchmarks: collect bench_*.py files and print the Cython speedup per input at the end.

``pytest bench/ --benchmark-only`` collects the bench_*.py modules here (the default
python_files pattern only knows test_*.py); naming a file on the command line works too.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # named files are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    try:
        from bench_materialise import MEDIANS
    except ImportError:
        return
    rows = [(group, impls) for group, impls in MEDIANS.items()
            if "python" in impls and "cython" in impls]
    if not rows:
        return
    tr = terminalreporter
    tr.section("materialiser: median per call, python vs cython")
    tr.write_line(f"{'input':<22}{'python':>14}{'cython':>14}{'speedup':>10}")
    for group, impls in rows:
        tr.write_line(f"{group:<22}{impls['python'] * 1e6:>12.1f}us{impls['cython'] * 1e6:>12.2f}us"
                      f"{impls['python'] / impls['cython']:>9.1f}x")
