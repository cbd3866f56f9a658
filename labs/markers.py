"""Lab markers in the production code, and cutting them out.

A lab's part of the reference solution is a block of whole statements between two comment
lines at the same indentation::

    # BEGIN LAB n: <what goes here, one line>
    ...statements...
    # END LAB n

``skeleton_source(text, n)`` replaces every block of lab n by one statement at the BEGIN
line's indentation, ``raise NotImplementedError("lab n: <what goes here>")``, so the
skeleton still imports and every call into the missing part fails loudly. Blocks of other
labs keep their code (their marker lines too). Blocks do not nest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)# BEGIN LAB (?P<lab>\d+):\s*(?P<hint>.*?)\s*$")
END_RE = re.compile(r"^(?P<indent>[ \t]*)# END LAB (?P<lab>\d+)\s*$")


class MarkerError(ValueError):
    """A BEGIN without its END, an END without its BEGIN, nesting or indentation mismatch."""


@dataclass(frozen=True)
class Block:
    lab: int
    hint: str
    indent: str
    begin_line: int   # 1-based line numbers of the marker lines
    end_line: int


def find_blocks(text: str, path: str = "<text>") -> list[Block]:
    """Every marked block of every lab in ``text``, in order; MarkerError if malformed."""
    blocks: list[Block] = []
    open_block = None
    for number, line in enumerate(text.splitlines(), start=1):
        begin = BEGIN_RE.match(line)
        end = END_RE.match(line)
        if begin:
            if open_block is not None:
                raise MarkerError(f"{path}:{number}: BEGIN LAB {begin['lab']} inside the block of "
                                  f"lab {open_block[0]} opened at line {open_block[3]}")
            if not begin["hint"]:
                raise MarkerError(f"{path}:{number}: BEGIN LAB {begin['lab']} needs a hint "
                                  f"after the colon (what goes here)")
            open_block = (int(begin["lab"]), begin["hint"], begin["indent"], number)
        elif end:
            if open_block is None or int(end["lab"]) != open_block[0]:
                raise MarkerError(f"{path}:{number}: END LAB {end['lab']} without its BEGIN")
            if end["indent"] != open_block[2]:
                raise MarkerError(f"{path}:{number}: END LAB {end['lab']} is not indented like "
                                  f"its BEGIN at line {open_block[3]}")
            blocks.append(Block(open_block[0], open_block[1], open_block[2], open_block[3], number))
            open_block = None
    if open_block is not None:
        raise MarkerError(f"{path}:{open_block[3]}: BEGIN LAB {open_block[0]} without its END")
    return blocks


def skeleton_source(text: str, lab: int, path: str = "<text>") -> tuple[str, int]:
    """(``text`` with lab's blocks replaced by NotImplementedError, number of blocks)."""
    blocks = [b for b in find_blocks(text, path) if b.lab == lab]
    if not blocks:
        return text, 0
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    cursor = 0
    for block in blocks:
        out.extend(lines[cursor:block.begin_line - 1])
        message = f"lab {lab}: {block.hint}"
        out.append(f"{block.indent}# LAB {lab}: your code replaces this line (see the handout)\n")
        out.append(f"{block.indent}raise NotImplementedError({message!r})\n")
        cursor = block.end_line
    out.extend(lines[cursor:])
    return "".join(out), len(blocks)
