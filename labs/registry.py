"""The labs: one ``Lab`` per lab, in order. Adding a lab is adding an entry here, a folder
labs/labN_name/ with README.md and test_labN.py, and BEGIN/END LAB N markers in the code
(docs/labs.md, "Adding a lab")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

LABS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Lab:
    number: int
    name: str                      # its folder under labs/
    title: str
    covers: str                    # one line: the mechanism, the paper sections
    files: tuple[str, ...]         # the production files holding its marked blocks
    #: labs whose marked code this lab's tests run through (their skeleton breaks ours
    #: only with NotImplementedError("lab M: ...")); tests/test_labs.py checks exactly that.
    builds_on: tuple[int, ...] = ()
    #: environment the grader sets (lab 3 grades the pure-Python materialiser twin).
    env: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return os.path.join(LABS_DIR, self.name)

    @property
    def handout(self) -> str:
        return os.path.join(self.folder, "README.md")

    @property
    def test_file(self) -> str:
        return os.path.join(self.folder, f"test_lab{self.number}.py")


LABS: tuple[Lab, ...] = (
    Lab(1, "lab1_quorum", "quorum math and the durable point",
        "acks to SCL, PGCL, VCL, VDL and commit release; the quorum core, no I/O "
        "([P17] 4.1, [P18] 2.3)",
        ("engine/writer/quorum.py",)),
    Lab(2, "lab2_storage_node", "the storage node: SCL and gossip",
        "append with SCL along the backlink chain, gossip to fill holes ([P17] 3.3, 4.2)",
        ("storage_node/chain.py", "storage_node/gossip.py")),
    Lab(3, "lab3_materialise", "materialisation and coalescing",
        "building a page version from the log, the pure-Python twin ([P17] 3.2, 3.3)",
        ("engine/format/materialise_py.py",),
        env={"AURORA_LITE_PURE_PYTHON": "1"}),
    Lab(4, "lab4_recovery", "recovery",
        "read quorum, VDL from the volume chain, truncation range, epochs and fencing "
        "([P17] 4.3, [P18] 2.4)",
        ("engine/writer/recovery.py",)),
    Lab(5, "lab5_replicas", "replicas and failover",
        "applying whole MTRs at VDL on a replica, promotion without losing a commit "
        "([P17] 4.2.4)",
        ("engine/instance/replica.py",),
        builds_on=(3,)),
    Lab(6, "lab6_clones", "clones and backtrack",
        "reading a parent as of a fork, time to LSN, truncation sets that move back and forth "
        "(docs/clones.md; [P17] 4.3)",
        ("engine/writer/backtrack.py", "storage_node/reads.py"),
        builds_on=(2, 3)),
)


def get(number: int) -> Lab:
    for lab in LABS:
        if lab.number == number:
            return lab
    raise KeyError(f"no lab {number}; labs are {', '.join(str(lab.number) for lab in LABS)}")
