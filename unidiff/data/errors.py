"""The one exception type the data package raises for bad user input.

``DataError`` subclasses ``ValueError`` so callers that already catch ``ValueError``
for flag validation keep working; its message is a single line naming the flag
(``--dataset``, ``--data_dir``, ...) or the file at fault and what was expected.
"""

from __future__ import annotations


class DataError(ValueError):
    """Missing or malformed data, raised before anything is compiled."""

    def __init__(self, message: str):
        # One line, so it reads well as the last line of a failed run.
        super().__init__(" ".join(str(message).split()))
