"""PgError: an error a PostgreSQL client sees, with its SQLSTATE; engine errors mapped to them.

The SQLSTATEs used (PostgreSQL's Appendix A): 0A000 feature_not_supported, 42601
syntax_error, 42P01 undefined_table, 42P07 duplicate_table, 42703 undefined_column,
42804 datatype_mismatch, 23505 unique_violation, 23502 not_null_violation, 22P02
invalid_text_representation, 22003 numeric_value_out_of_range, 22001 string_data_right_truncation,
22012 division_by_zero, 25P02 in_failed_sql_transaction, 25006 read_only_sql_transaction,
40001 serialization_failure (also: a commit refused before anything was logged),
40P01 deadlock_detected, 58030 io_error (storage unavailable for a read), 54000 program_limit_exceeded,
08P01 protocol_violation, 26000 invalid_sql_statement_name, 34000 invalid_cursor_name,
57P01 admin_shutdown, 08006 connection_failure (a commit's outcome unknown),
XX000 internal_error.
"""

from __future__ import annotations

from engine import errors


class PgError(Exception):
    """An error for the client: SQLSTATE ``code``, message, severity."""

    def __init__(self, code: str, message: str, severity: str = "ERROR") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.severity = severity


class CommitUnknown(Exception):
    """An engine commit failed after its records were logged (its cause is the engine's
    exception): it may or may not become durable (engine/pg/session.py raises it)."""


def not_supported(what: str) -> PgError:
    return PgError("0A000", f"feature not supported by aurora-lite: {what}")


def from_engine(exc: Exception) -> PgError:
    """The PgError for an exception of the engine (engine/errors.py) or of Python."""
    if isinstance(exc, PgError):
        return exc
    if isinstance(exc, errors.ConflictError):
        return PgError("40001", f"could not serialize access due to concurrent update ({exc})")
    if isinstance(exc, errors.ReadOnlyError):
        return PgError("25006", f"cannot execute this in a read-only transaction ({exc})")
    if isinstance(exc, errors.TooLargeError):
        return PgError("54000", str(exc))
    if isinstance(exc, errors.CommitRefused):
        # Class 40 is "transaction rollback": the transaction did not commit. 40001 is the
        # code clients retry by themselves (pgbench --max-tries, ORM retry loops), and a
        # retry is safe: nothing of it was logged. The message says what happened.
        return PgError("40001", f"the transaction was NOT committed (refused before anything "
                                f"was written; safe to retry, on the new writer if it moved): {exc}")
    if isinstance(exc, CommitUnknown):
        return PgError("08006", f"storage unavailable, the outcome of this COMMIT is unknown "
                                f"(it may or may not be durable; read to find out): {exc.__cause__}")
    if isinstance(exc, (errors.WriteQuorumUnavailable, errors.CommitOutcomeUnknown)):
        return PgError("08006", f"storage unavailable, outcome unknown: {exc}")
    if isinstance(exc, errors.UnavailableError):
        # Not a commit (a commit's failures are CommitRefused or CommitUnknown): a read or
        # another request failed; the transaction is rolled back and nothing was committed.
        return PgError("58030", f"storage unavailable, the statement failed and the transaction "
                                f"was NOT committed: {exc}")
    if isinstance(exc, errors.AuroraError):
        return PgError("XX000", f"{type(exc).__name__}: {exc}")
    return PgError("XX000", f"internal error: {type(exc).__name__}: {exc}")
