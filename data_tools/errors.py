"""The one error type of data_tools: bad input, reported as ``file:line: field 'x': what``."""
from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad input data or options. The message names the file, line and field where known."""

    def __init__(self, message: str, *, path: Optional[str] = None, line: Optional[int] = None,
                 field: Optional[str] = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        super().__init__(format_location(path, line, field, message))


def format_location(path, line, field, message) -> str:
    loc = ""
    if path is not None:
        loc = str(path)
        if line is not None:
            loc += f":{line}"
        loc += ": "
    if field is not None:
        loc += f"field '{field}': "
    return loc + message


class FileError(DataError):
    """An error about an input as a whole rather than one bad record (an .npy's dtype, its sidecar's ranges
    overlapping or leaving gaps): ``--skip-bad`` does not quarantine it, the build stops."""
