"""Coursework labs on quorum storage (docs/labs.md).

The reference solution of every lab is aurora-lite's own production code: each lab's part
is marked in it with ``# BEGIN LAB n: <what goes here>`` / ``# END LAB n`` comment lines.

- labs/registry.py: the labs (number, title, what they cover, files, tests, dependencies);
- labs/markers.py: finding the marked blocks and cutting them out of a source file;
- labs/tree.py: writing a student tree (`aurora-lite lab make N --out DIR`);
- labs/grading.py: running a lab's tests against a tree and scoring them
  (`aurora-lite lab grade N`);
- labs/support.py: what the labs' tests share (record chains and their oracle, a real
  cluster run through the CLI);
- labs/labN_*/: one folder per lab: its handout (README.md) and its tests.
"""
