"""Exceptions shared by the formats, the materialiser and everything above them.

The format errors are raised identically (same class, same message) by the pure-Python
materialiser and by its Cython twin, so tests can compare the two on corrupt input.
Never catch FormatError to carry on with the data: a batch or page that raises it is
rejected whole.
"""


class AuroraError(Exception):
    """Base class of every error aurora-lite raises on purpose."""


# --- Format errors: the bytes are wrong -------------------------------------------------


class FormatError(AuroraError):
    """A redo record, batch or page is malformed."""


class TruncatedError(FormatError):
    """The buffer ends inside a record header or payload."""


class ChecksumError(FormatError):
    """A record's or a page's CRC32 does not match its bytes."""


class UnknownRecordTypeError(FormatError):
    """A record carries a type byte this version does not know."""


class BadLengthError(FormatError):
    """A length, slot number or offset is impossible for the record or page it is in."""


class PageFullError(FormatError):
    """A cell does not fit in the page, even after compaction."""


class PageOrderError(FormatError):
    """A record does not continue its page's chain (its LSN or page backlink is wrong)."""


class WrongPageTypeError(FormatError):
    """A record was applied to a page of the wrong type (e.g. COMMIT to a leaf)."""


# --- Invariant violations: a bug, never a refusal ---------------------------------------


class InvariantViolation(AuroraError):
    """A check that guards data found one of ARCHITECTURE.md's invariants broken (a bug).

    Raised instead of ``assert`` so that ``python -O`` cannot remove the check: the
    operation stops before it acknowledges, evicts or stores anything on a broken premise.
    ``invariant`` is the invariant's number (ARCHITECTURE.md, "Invariants")."""

    def __init__(self, invariant: int, message: str) -> None:
        super().__init__(f"invariant {invariant}: {message}")
        self.invariant = invariant


# --- Database errors: what a client may see ----------------------------------------------


class DatabaseError(AuroraError):
    """Base of the errors the database service and the client library raise."""


class KeyNotFound(DatabaseError, KeyError):
    """The key is not in the table (or the table does not exist)."""


class TableNotFound(DatabaseError):
    """No table of that name."""


class TableExistsError(DatabaseError):
    """A table of that name already exists."""


class ConflictError(DatabaseError):
    """Another transaction committed a write to a key this transaction wrote; retry."""


class TooLargeError(DatabaseError):
    """A key or value exceeds the documented maximum size."""


class UnavailableError(DatabaseError):
    """The database cannot serve the request right now (storage or instance down)."""


class WriteQuorumUnavailable(UnavailableError):
    """Fewer than 4 of 6 segments of some PG acknowledge writes; commits wait."""


class CommitOutcomeUnknown(UnavailableError):
    """The instance failed (died, was fenced, stepped down) after the commit was sent:
    it may or may not be durable. Never retried for you; read to find out."""


class ReadOnlyError(DatabaseError):
    """This instance is a read replica (or a fenced former writer): writes are refused."""


class FencedError(ReadOnlyError):
    """Storage rejected this writer's volume epoch: a newer writer has taken over."""


class OutOfWindowError(DatabaseError):
    """A backtrack, as-of read or clone names a point outside what storage keeps (before
    the retention window, before a clone's creation, after the VDL). The message says
    what the window is."""


class TransactionClosedError(DatabaseError):
    """The transaction was already committed or aborted."""
