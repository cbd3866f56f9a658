"""Errors a storage node returns, and how they travel to the caller.

Every refusal is a transport status (gRPC's names) with a human-readable detail plus the trailing
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
    UNKNOWN_SEGMENT       NOT_FOUND            the PG is not placed on this node (a fleet:
                                               docs/fleet.md); the node holds no segment of it
    READ_POINT_ABOVE_SCL  OUT_OF_RANGE         segment is not complete up to the read point
    READ_POINT_BELOW_GC   OUT_OF_RANGE         versions below the GC horizon are gone
    PAGE_NOT_FOUND        NOT_FOUND            page was never initialised as of the read point
    CORRUPT               DATA_LOSS            stored bytes failed their checksum and could not
                                               be repaired from a peer yet (never served)
    UNBUILDABLE           DATA_LOSS            the page's records pass their checksums but one
                                               cannot apply to it (slot out of range, wrong
                                               page type): that page cannot be built; every
                                               other page is served (docs/storage-node.md)
    STALE_MEMBERSHIP      FAILED_PRECONDITION  request membership epoch < segment's (the PG
                                               changed members); metadata
                                               "aurora-current-membership-epoch" = current

This module does not import grpc. A StorageError is an engine.errors.RpcError: the store
and the handlers (storage_node/service.py) raise it, and the transport (engine/transport)
carries its status, code and metadata to the caller, who sees an RpcError with the same
``code`` (``aurora_error_of(error)`` reads it from a raw grpc error in tests too).
"""

from __future__ import annotations

from engine import errors
from engine.errors import ErrorCode

METADATA_ERROR = errors.METADATA_ERROR
METADATA_CURRENT_EPOCH = errors.METADATA_CURRENT_EPOCH

# The codes themselves live in one place, engine.errors.ErrorCode; these names stay for
# the store and the tests.
STALE_EPOCH = ErrorCode.STALE_EPOCH
EPOCH_AHEAD = ErrorCode.EPOCH_AHEAD
BAD_CHECKSUM = ErrorCode.BAD_CHECKSUM
MALFORMED = ErrorCode.MALFORMED
WRONG_PG = ErrorCode.WRONG_PG
UNKNOWN_VOLUME = ErrorCode.UNKNOWN_VOLUME
UNKNOWN_SEGMENT = ErrorCode.UNKNOWN_SEGMENT
READ_POINT_ABOVE_SCL = ErrorCode.READ_POINT_ABOVE_SCL
READ_POINT_BELOW_GC = ErrorCode.READ_POINT_BELOW_GC
PAGE_NOT_FOUND = ErrorCode.PAGE_NOT_FOUND
CORRUPT = ErrorCode.CORRUPT
UNBUILDABLE = ErrorCode.UNBUILDABLE
STALE_MEMBERSHIP = ErrorCode.STALE_MEMBERSHIP
METADATA_CURRENT_MEMBERSHIP = errors.METADATA_CURRENT_MEMBERSHIP

#: code -> the transport status it travels as.
STATUS_OF = {
    STALE_EPOCH: "FAILED_PRECONDITION",
    EPOCH_AHEAD: "FAILED_PRECONDITION",
    BAD_CHECKSUM: "DATA_LOSS",
    MALFORMED: "INVALID_ARGUMENT",
    WRONG_PG: "INVALID_ARGUMENT",
    UNKNOWN_VOLUME: "NOT_FOUND",
    UNKNOWN_SEGMENT: "NOT_FOUND",
    READ_POINT_ABOVE_SCL: "OUT_OF_RANGE",
    READ_POINT_BELOW_GC: "OUT_OF_RANGE",
    PAGE_NOT_FOUND: "NOT_FOUND",
    CORRUPT: "DATA_LOSS",
    UNBUILDABLE: "DATA_LOSS",
    STALE_MEMBERSHIP: "FAILED_PRECONDITION",
}


class StorageError(errors.RpcError):
    """A request the node refuses. ``code`` is one of the codes above; the transport
    carries it to the caller as an RpcError with the status of ``STATUS_OF``."""

    code: str = MALFORMED

    def __init__(self, message: str, *, code: str | None = None) -> None:
        code = code if code is not None else type(self).code
        if code not in STATUS_OF:
            raise ValueError(f"unknown storage error code {code!r}")
        super().__init__(STATUS_OF[code], message, code)


class StaleEpochError(StorageError):
    """The request's volume epoch is older than the segment's: the sender is deposed."""

    code = STALE_EPOCH

    def __init__(self, message: str, current_epoch: int) -> None:
        super().__init__(message)
        self.current_epoch = current_epoch
        self.metadata[METADATA_CURRENT_EPOCH] = str(current_epoch)


class StaleMembershipError(StorageError):
    """The request's membership epoch is older than the segment's: the PG changed members
    since the sender last looked (docs/membership.md). Not a fencing: the sender fetches
    the current membership and retries."""

    code = STALE_MEMBERSHIP

    def __init__(self, message: str, current_epoch: int) -> None:
        super().__init__(message)
        self.current_epoch = current_epoch
        self.metadata[METADATA_CURRENT_MEMBERSHIP] = str(current_epoch)


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


class UnknownSegmentError(StorageError):
    code = UNKNOWN_SEGMENT


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
    """The ``aurora-error`` code of a failed call: an RpcError, or a grpc.RpcError seen by
    a test that calls a node with grpc directly (None if it carries none)."""
    if isinstance(rpc_error, errors.RpcError):
        return rpc_error.code or None
    for key, value in rpc_error.trailing_metadata() or ():
        if key == METADATA_ERROR:
            return value
    return None


def current_epoch_of(rpc_error) -> int | None:
    """The ``aurora-current-epoch`` of a STALE_EPOCH refusal, else None."""
    if isinstance(rpc_error, errors.RpcError):
        value = rpc_error.metadata.get(METADATA_CURRENT_EPOCH)
        return int(value) if value is not None else None
    for key, value in rpc_error.trailing_metadata() or ():
        if key == METADATA_CURRENT_EPOCH:
            return int(value)
    return None
