"""The checks that guard invariants 4-7 survive ``python -O`` (issue 15, section 4).

``python -O`` strips every ``assert``. Each check here runs in a fresh ``python -O``
interpreter (which must really drop asserts) and must raise
``engine.errors.InvariantViolation`` with its invariant's number:

    4  the SCL walk of a segment never moves the SCL back (storage_node/store.py)
    5  records are registered in LSN order; VDL <= VCL; neither moves back
       (engine/writer/quorum.py)
    6  no LSN above VDL + LAL is allocated (engine/db/sink.py, LsnAllocator)
    7  the buffer pool never evicts a page above VDL, nor a pinned one
       (engine/db/buffer_pool.py)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = '''
from engine.errors import InvariantViolation
try:
    assert False
except AssertionError:
    raise SystemExit("this interpreter keeps asserts: run it with python -O")

def expect(invariant, fn):
    try:
        fn()
    except InvariantViolation as exc:
        assert exc.invariant == invariant  # (stripped under -O, so check again below)
        if exc.invariant != invariant:
            raise SystemExit(f"wrong invariant: {exc}")
        print("RAISED", exc)
        return
    raise SystemExit("NOT RAISED: the check vanished")
'''

CHECKS = {
    "lal_6": '''
from engine.db.sink import LsnAllocator
a = LsnAllocator(10)
a.limit_lsn = 11
a.allocate(0)
expect(6, lambda: a.allocate(0))
''',
    "lsn_order_5": '''
from engine.writer.quorum import QuorumTracker
t = QuorumTracker([f"sn{i}" for i in range(1, 7)])
t.record_sent(5, 0, True)
expect(5, lambda: t.record_sent(5, 0, True))
''',
    "vdl_above_vcl_5": '''
from engine.writer.quorum import QuorumTracker
t = QuorumTracker([f"sn{i}" for i in range(1, 7)])
t.record_sent(1, 0, True)
t.record_sent(2, 1, True)
t.vdl = 5  # a corrupted state: VDL above every record sent
def acks():
    for n in t.nodes:
        t.ack(n, 0, 1)
expect(5, acks)
''',
    "evict_above_vdl_7": '''
from engine.db.buffer_pool import BufferPool, CAPACITY_MIN_PAGES
from engine.format import page as pagefmt
class Sink:
    vdl = 3
pool = BufferPool(CAPACITY_MIN_PAGES, Sink())
image = pagefmt.new_page(7, pagefmt.PageType.LEAF) if hasattr(pagefmt, "new_page") else None
if image is None:
    from engine import materialiser
    from engine.format import redo
    rec = redo.encode_record(9, 0, 0, 0, 7, redo.RecordType.INIT_PAGE, 0,
                             redo.p_init_page(pagefmt.PageType.LEAF))
    image = materialiser.apply(None, 7, rec)
assert pagefmt.page_lsn(image) > Sink.vdl
pool.put_new(7, bytearray(image))
expect(7, lambda: pool._evict(7))
''',
    "scl_back_4": '''
import tempfile
import storage_node.store as st
import storage_node.chain as chain       # the SCL walk (invariant 4) reads runs through it
from engine.format import page as pagefmt
from engine.format import redo
d = tempfile.mkdtemp()
s = st.Store(d, "sn1")
s.apply_ops([st.CreateVolumeOp("v", 1, 64, 1)])
info = s.volume("v")
def batch(lsn, prev):
    rec = redo.encode_record(lsn, prev, prev, 0, 1, redo.RecordType.INIT_PAGE, redo.FLAG_CPL,
                             redo.p_init_page(pagefmt.PageType.LEAF))
    return st.AppendOp("v", 1, 0, [st.verify_and_prepare(info.layout, info.vol_id, 0, rec)])
s.apply_ops([batch(1, 0)])
s.apply_ops([batch(3, 2)])            # a hole: SCL stays 1
assert s.segment("v", 0).scl == 1
real = chain.decode_run
def broken(value):                    # a run directory that lies (a merge bug): the
    run = real(value)                 # walk would take the SCL down to 0
    return run._replace(lsns=(run.lsns[0], 0), flags=1) if run.lsns == (3,) else run
chain.decode_run = broken
expect(4, lambda: s.apply_ops([batch(2, 1)]))
chain.decode_run = real
if s.segment("v", 0).scl != 1:
    raise SystemExit(f"the SCL moved: {s.segment('v', 0).scl}")
''',
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_raises_under_python_O(name):
    script = PRELUDE + textwrap.dedent(CHECKS[name])
    result = subprocess.run([sys.executable, "-O", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "RAISED invariant" in result.stdout, (
        f"{name} under python -O: rc {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}")
