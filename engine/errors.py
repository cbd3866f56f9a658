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
