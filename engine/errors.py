"""Exceptions shared by the formats, the materialiser and everything above them.

The format errors are raised identically (same class, same message) by the pure-Python
materialiser and by its Cython twin, so tests can compare the two on corrupt input.
Never catch FormatError to carry on with the data: a batch or page that raises it is
rejected whole.
"""


from enum import StrEnum


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


class CommitRefused(UnavailableError):
    """A commit was refused before any of its records was logged (no LSN allocated, nothing
    shipped: e.g. the writer stepped down or is stopping): nothing of the transaction is or
    can become durable, so running it again is safe. Raised by Database commits in place of
    the UnavailableError that refused them."""


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


# --- Wire errors: a call between processes failed ----------------------------------------


class ErrorCode(StrEnum):
    """The machine-readable ``aurora-error`` codes that travel with a refused call, one
    place for all of them (the tables at the top of proto/aurora_pb/storage.proto and
    database.proto are the contract). A StrEnum, so a code compares equal to its string."""

    # Storage service (storage_node/errors.py maps each to its status).
    STALE_EPOCH = "STALE_EPOCH"                    # request epoch < segment's (invariant 9)
    EPOCH_AHEAD = "EPOCH_AHEAD"                    # request epoch > segment's: missed a Truncate
    BAD_CHECKSUM = "BAD_CHECKSUM"                  # a record's CRC does not match
    MALFORMED = "MALFORMED"                        # truncated / impossible record or request
    WRONG_PG = "WRONG_PG"                          # a record's page is not in the batch's PG
    UNKNOWN_VOLUME = "UNKNOWN_VOLUME"              # no such volume on this node
    UNKNOWN_SEGMENT = "UNKNOWN_SEGMENT"            # the volume's PG has no segment on this node
    READ_POINT_ABOVE_SCL = "READ_POINT_ABOVE_SCL"  # segment not complete to the read point
    READ_POINT_BELOW_GC = "READ_POINT_BELOW_GC"    # versions below the GC horizon are gone
    PAGE_NOT_FOUND = "PAGE_NOT_FOUND"              # page never initialised as of the read point
    CORRUPT = "CORRUPT"                            # stored bytes failed their checksum
    UNBUILDABLE = "UNBUILDABLE"                    # a record passes its CRC but cannot apply
    STALE_MEMBERSHIP = "STALE_MEMBERSHIP"          # request membership epoch < segment's
    # Database service (engine/instance/server.py sets them, engine/client.py maps them).
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    TABLE_NOT_FOUND = "TABLE_NOT_FOUND"
    CONFLICT = "CONFLICT"
    TOO_LARGE = "TOO_LARGE"
    BAD_REQUEST = "BAD_REQUEST"
    WRITE_QUORUM_UNAVAILABLE = "WRITE_QUORUM_UNAVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"
    READ_ONLY = "READ_ONLY"
    FENCED = "FENCED"
    TXN_CLOSED = "TXN_CLOSED"
    OUT_OF_WINDOW = "OUT_OF_WINDOW"


#: Trailing-metadata key of the machine-readable code.
METADATA_ERROR = "aurora-error"
#: Trailing-metadata key of the segment's current volume epoch (STALE_EPOCH only).
METADATA_CURRENT_EPOCH = "aurora-current-epoch"
#: Trailing-metadata key of the segment's current membership epoch (STALE_MEMBERSHIP only).
METADATA_CURRENT_MEMBERSHIP = "aurora-current-membership-epoch"
#: Trailing-metadata key the instance sets when a refused request certainly did nothing.
METADATA_NOTHING_DONE = "aurora-nothing-done"


class RpcError(AuroraError):
    """A call to another process failed, as every transport reports it (engine/transport).

    ``status`` is a status name of ``engine.transport.STATUSES`` ("UNAVAILABLE",
    "FAILED_PRECONDITION", ...); ``code`` the ``aurora-error`` code the server set ("" if
    none); ``metadata`` the other trailing pairs. A handler raises it (or a subclass, such
    as storage_node.errors.StorageError) to refuse a request.
    """

    def __init__(self, status: str, detail: str = "", code: str = "",
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(detail or status)
        self.status = status
        self.detail = detail
        self.code = code
        self.metadata = dict(metadata or {})

    @property
    def unreachable(self) -> bool:
        """True if the server did not answer (down, partitioned, or too slow)."""
        return self.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")

    def trailing(self) -> dict[str, str]:
        """Every trailing pair this error travels with, the code included."""
        pairs = dict(self.metadata)
        if self.code:
            pairs[METADATA_ERROR] = str(self.code)
        return pairs

    def __str__(self) -> str:
        return f"{self.code or self.status}: {self.detail}" if self.detail else (self.code or self.status)

