"""PgError: an error a PostgreSQL client sees, with its SQLSTATE; engine errors mapped to them.

The SQLSTATEs used (PostgreSQL's Appendix A): 0A000 feature_not_supported, 42601
syntax_error, 42P01 undefined_table, 42P07 duplicate_table, 42703 undefined_column,
42804 datatype_mismatch, 23505 unique_violation, 23502 not_null_violation, 22P02
invalid_text_representation, 22003 numeric_value_out_of_range, 22001 string_data_right_truncation,
22012 division_by_zero, 25P02 in_failed_sql_transaction, 25006 read_only_sql_transaction,
40001 serialization_failure, 40P01 deadlock_detected, 54000 program_limit_exceeded,
08P01 protocol_violation, 26000 invalid_sql_statement_name, 34000 invalid_cursor_name,
57P01 admin_shutdown, XX000 internal_error.
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
    if isinstance(exc, (errors.WriteQuorumUnavailable, errors.UnavailableError)):
        return PgError("08006", f"storage unavailable, outcome unknown: {exc}")
    if isinstance(exc, errors.AuroraError):
        return PgError("XX000", f"{type(exc).__name__}: {exc}")
    return PgError("XX000", f"internal error: {type(exc).__name__}: {exc}")
