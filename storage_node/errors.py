"""Errors a storage node returns, and how they travel over gRPC.

Every refusal is a gRPC status code with a human-readable detail plus the trailing
metadata key ``aurora-error`` carrying one machine-readable code (the table at the top of
proto/aurora_pb/storage.proto is the contract; this module mirrors it)::

    code                  status               meaning
    STALE_EPOCH           FAILED_PRECONDITION  request volume epoch < segment's (invariant 9);
                                               metadata "aurora-current-epoch" = current epoch
    EPOCH_AHEAD           FAILED_PRECONDITION  request epoch > segment's: the node missed a
                                               Truncate; the caller sends it Truncate first
    BAD_CHECKSUM          DATA_LOSS            a record's CRC does not match; nothing stored
    MALFORMED             INVALID_ARGUMENT     truncated / impossible record or request
    WRONG_PG              INVALID_ARGUMENT     a record's page is not in the batch's PG
    UNKNOWN_VOLUME        NOT_FOUND            no such volume on this node
    READ_POINT_ABOVE_SCL  OUT_OF_RANGE         segment is not complete up to the read point
    READ_POINT_BELOW_GC   OUT_OF_RANGE         versions below the GC horizon are gone
    PAGE_NOT_FOUND        NOT_FOUND            page was never initialised as of the read point
    CORRUPT               DATA_LOSS            stored bytes failed their checksum and could not
                                               be repaired from a peer yet (never served)
    UNBUILDABLE           DATA_LOSS            the page's records pass their checksums but one
                                               cannot apply to it (slot out of range, wrong
                                               page type): that page cannot be built; every
                                               other page is served (docs/storage-node.md)

This module does not import grpc: the store raises these exceptions, and only the rpc
layer (storage_node/service.py) turns ``status`` (a grpc.StatusCode member *name*) into a
real status. Clients (tests, the writer's storage driver) read the code back with
``aurora_error_of(rpc_error)``.
"""

from __future__ import annotations

#: Trailing-metadata key holding the machine-readable error code.
METADATA_ERROR = "aurora-error"
#: Trailing-metadata key holding the segment's current volume epoch (STALE_EPOCH only).
METADATA_CURRENT_EPOCH = "aurora-current-epoch"

STALE_EPOCH = "STALE_EPOCH"
EPOCH_AHEAD = "EPOCH_AHEAD"
BAD_CHECKSUM = "BAD_CHECKSUM"
MALFORMED = "MALFORMED"
WRONG_PG = "WRONG_PG"
UNKNOWN_VOLUME = "UNKNOWN_VOLUME"
READ_POINT_ABOVE_SCL = "READ_POINT_ABOVE_SCL"
READ_POINT_BELOW_GC = "READ_POINT_BELOW_GC"
PAGE_NOT_FOUND = "PAGE_NOT_FOUND"
CORRUPT = "CORRUPT"
UNBUILDABLE = "UNBUILDABLE"

#: code -> name of the grpc.StatusCode it travels as.
STATUS_OF = {
    STALE_EPOCH: "FAILED_PRECONDITION",
    EPOCH_AHEAD: "FAILED_PRECONDITION",
    BAD_CHECKSUM: "DATA_LOSS",
    MALFORMED: "INVALID_ARGUMENT",
    WRONG_PG: "INVALID_ARGUMENT",
    UNKNOWN_VOLUME: "NOT_FOUND",
    READ_POINT_ABOVE_SCL: "OUT_OF_RANGE",
    READ_POINT_BELOW_GC: "OUT_OF_RANGE",
    PAGE_NOT_FOUND: "NOT_FOUND",
    CORRUPT: "DATA_LOSS",
    UNBUILDABLE: "DATA_LOSS",
}


class StorageError(Exception):
    """A request the node refuses. ``code`` is one of the codes above."""

    code: str = MALFORMED

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        assert self.code in STATUS_OF, self.code

    @property
    def status(self) -> str:
        """Name of the grpc.StatusCode member this error travels as."""
        return STATUS_OF[self.code]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata to send with the status."""
        return ((METADATA_ERROR, self.code),)


class StaleEpochError(StorageError):
    """The request's volume epoch is older than the segment's: the sender is deposed."""

    code = STALE_EPOCH

    def __init__(self, message: str, current_epoch: int) -> None:
        super().__init__(message)
        self.current_epoch = current_epoch

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_ERROR, self.code), (METADATA_CURRENT_EPOCH, str(self.current_epoch)))


class EpochAheadError(StorageError):
    """The request's epoch is newer than the segment's: this node missed a Truncate."""

    code = EPOCH_AHEAD


class BadChecksumError(StorageError):
    code = BAD_CHECKSUM


class MalformedError(StorageError):
    code = MALFORMED


class WrongPgError(StorageError):
    code = WRONG_PG


class UnknownVolumeError(StorageError):
    code = UNKNOWN_VOLUME


class ReadPointAboveSclError(StorageError):
    code = READ_POINT_ABOVE_SCL


class ReadPointBelowGcError(StorageError):
    code = READ_POINT_BELOW_GC


class PageNotFoundError(StorageError):
    code = PAGE_NOT_FOUND


class CorruptError(StorageError):
    """Stored bytes failed their checksum (invariant 13); they are never served."""

    code = CORRUPT


class UnbuildablePageError(StorageError):
    """A stored record passes its checksum but cannot apply to its page: the page cannot
    be built at that read point (never served; the rest of the node is unaffected)."""

    code = UNBUILDABLE


def aurora_error_of(rpc_error) -> str | None:
    """The ``aurora-error`` code of a grpc.RpcError (or None if it carries none)."""
    md = rpc_error.trailing_metadata() or ()
    for key, value in md:
        if key == METADATA_ERROR:
            return value
    return None


def current_epoch_of(rpc_error) -> int | None:
    """The ``aurora-current-epoch`` of a STALE_EPOCH grpc.RpcError, else None."""
    md = rpc_error.trailing_metadata() or ()
    for key, value in md:
        if key == METADATA_CURRENT_EPOCH:
            return int(value)
    return None
