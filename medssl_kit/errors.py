"""The project's error types.

Every problem with user input (a manifest, an image file, a run folder) raises a subclass of
:class:`MedsslError` whose message names the case id and the file concerned and says what to do.
The CLI turns these into a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedsslError(Exception):
    """Base class of every error medssl_kit raises on bad user input."""


class ManifestError(MedsslError):
    """A manifest, or a case it lists, is unusable.

    ``case_id`` and ``path`` are kept as attributes (``None`` when not applicable) and are
    always part of the message, so a user can find the culprit.
    """

    def __init__(self, message: str, *, case_id: str | None = None, path: str | Path | None = None):
        self.case_id = case_id
        self.path = None if path is None else str(path)
        where = []
        if case_id is not None:
            where.append(f"case '{case_id}'")
        if path is not None:
            where.append(f"file '{path}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
