"""Input rules the backend and the coordinator share (private): bad input is refused before
anything is reserved or registered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .errors import EmptyPrompt, InvalidRunId, SessionMissing
from .events import Attachment

__all__ = ["MAX_RUN_ID_LENGTH", "validate_run_id", "validate_submission"]

MAX_RUN_ID_LENGTH: Final = 256


def validate_submission(
    session_id: object, prompt: object, run_id: object, attachments: Iterable[object]
) -> None:
    """Raise the typed error for the first thing wrong with a submission; else nothing."""
    if not isinstance(session_id, str) or not session_id.strip():
        raise SessionMissing()
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    checked: list[Attachment] = []
    for attachment in attachments:
        if not isinstance(attachment, Attachment):
            raise TypeError(f"attachments must be Attachment values, got {type(attachment)}")
        checked.append(attachment)
    if not prompt.strip() and not any(a.has_text() for a in checked):
        raise EmptyPrompt()
    if run_id != "":
        validate_run_id(run_id)


def validate_run_id(run_id: object) -> None:
    """Raise ``InvalidRunId`` unless ``run_id`` is a usable run id."""
    if not isinstance(run_id, str):
        raise InvalidRunId(run_id, "it must be a str")
    if not run_id or len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidRunId(run_id, f"it must be 1 to {MAX_RUN_ID_LENGTH} characters long")
    if not run_id.isprintable() or " " in run_id:
        raise InvalidRunId(run_id, "it must not contain whitespace or control characters")
