"""Input rules the backend, the coordinator and the HTTP service share (private): bad input
is refused before anything is reserved or registered.

**The identifier rule.** A run id or a session id is 1 to 256 characters, none of them
whitespace (as ``str.isspace`` reads it), a control character (Unicode category Cc), a lone
surrogate or ``/``, and it is not ``.`` or ``..``. Such an id survives a URL path segment
once percent-encoded: no client drops it as a dot segment and no router splits it at a
slash, so every route that takes it reaches it. :data:`ID_PATTERN` spells the rule as a
regular expression that Python's ``re`` and ECMA-262 (JSON Schema, OpenAPI) read alike, and
the HTTP schema publishes it; lone surrogates are left out of the pattern (no UTF-8 text
can carry one, and ECMA-262 engines disagree about them) and checked here.

Prompts are text: any character but NUL, and no lone surrogates. Workspace paths: not
blank, no control characters and no lone surrogates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from .errors import EmptyPrompt, InvalidLabels, InvalidRunId, InvalidSessionId, SessionMissing
from .events import Attachment

__all__ = [
    "ID_PATTERN",
    "LABEL_KEY_PATTERN",
    "MAX_ID_LENGTH",
    "MAX_LABELS",
    "MAX_LABEL_VALUE_LENGTH",
    "MAX_RUN_ID_LENGTH",
    "PATH_PATTERN",
    "PROMPT_PATTERN",
    "id_problem",
    "is_valid_id",
    "labels_problem",
    "prompt_problem",
    "validate_labels",
    "validate_prompt",
    "validate_run_id",
    "validate_session_id",
    "validate_submission",
    "validate_workspace_path",
    "workspace_path_problem",
]

MAX_ID_LENGTH: Final = 256
"""The longest run or session id, in characters."""

MAX_RUN_ID_LENGTH: Final = MAX_ID_LENGTH

# Every character str.isspace() accepts, spelled out: ``\s`` means different sets in Python
# and in ECMA-262, and the published pattern must mean one thing to both.
_SPACE: Final = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Unicode category Cc, all of it.
_CONTROL: Final = r"\x00-\x1f\x7f-\x9f"

ID_PATTERN: Final = rf"^(?!\.\.?$)[^{_CONTROL}{_SPACE}/]{{1,{MAX_ID_LENGTH}}}$"
"""The identifier rule as a pattern (lone surrogates aside, see the module docstring)."""

PROMPT_PATTERN: Final = rf"^(?![{_SPACE}]*$)[^\x00]*$"
"""A prompt over HTTP: not blank, no NUL."""

PATH_PATTERN: Final = rf"^(?![{_SPACE}]*$)[^{_CONTROL}]*$"
"""A workspace path: not blank, no control characters."""

_ID: Final = re.compile(ID_PATTERN)

MAX_LABELS: Final = 16
"""The most labels a run may carry."""
MAX_LABEL_VALUE_LENGTH: Final = 256
"""The longest label value, in characters."""
LABEL_KEY_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,64}$"
"""A label key: 1 to 64 characters of ``[A-Za-z0-9_.-]`` (the same in Python and ECMA-262)."""
_LABEL_KEY: Final = re.compile(LABEL_KEY_PATTERN)


def _has_lone_surrogate(text: str) -> bool:
    # A str encodes as UTF-8 unless it holds a lone surrogate. An ASCII one (CPython knows
    # without looking) holds none: most ids and prompts, spared the encoding on every send.
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def id_problem(value: str) -> str | None:
    """Why ``value`` breaks the identifier rule, or ``None`` if it is a usable id."""
    if not value or len(value) > MAX_ID_LENGTH:
        return f"it must be 1 to {MAX_ID_LENGTH} characters long"
    if value in {".", ".."}:
        return "'.' and '..' are not addressable in a URL path"
    if "/" in value:
        return "it must not contain '/'"
    if _has_lone_surrogate(value):
        return "it must not contain lone surrogates"
    # re.fullmatch, not re.search: Python's '$' also matches before a trailing newline.
    if _ID.fullmatch(value) is None:
        return "it must not contain whitespace or control characters"
    return None


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a str that follows the identifier rule."""
    return isinstance(value, str) and id_problem(value) is None


def validate_run_id(run_id: object) -> None:
    """Raise ``InvalidRunId`` unless ``run_id`` follows the identifier rule."""
    if not isinstance(run_id, str):
        raise InvalidRunId(run_id, "it must be a str")
    problem = id_problem(run_id)
    if problem is not None:
        raise InvalidRunId(run_id, problem)


_VALID_SESSION_IDS: dict[str, None] = {}
"""Session ids (exact ``str``) found valid lately: a session sends many runs, and the rule is a
pure function of the id. Emptied when full, so it stays small."""
_VALID_SESSION_IDS_MAX: Final = 4096


def validate_session_id(session_id: object) -> None:
    """Raise ``SessionMissing`` for a blank (or non-str) session id, ``InvalidSessionId``
    for one that breaks the identifier rule."""
    if type(session_id) is str and session_id in _VALID_SESSION_IDS:
        return
    if not isinstance(session_id, str) or not session_id.strip():
        raise SessionMissing()
    problem = id_problem(session_id)
    if problem is not None:
        raise InvalidSessionId(session_id, problem)
    if type(session_id) is str:
        if len(_VALID_SESSION_IDS) >= _VALID_SESSION_IDS_MAX:
            _VALID_SESSION_IDS.clear()
        _VALID_SESSION_IDS[session_id] = None


def prompt_problem(prompt: str) -> str | None:
    """Why ``prompt`` is not usable text (NUL, lone surrogates), or ``None``. Blankness is
    :class:`EmptyPrompt`'s business (a text attachment can make up for a blank prompt)."""
    if "\x00" in prompt:
        return "the prompt must not contain NUL characters"
    if _has_lone_surrogate(prompt):
        return "the prompt must not contain lone surrogates"
    return None


def validate_prompt(prompt: object) -> str:
    """Return ``prompt``; raise ``TypeError`` if it is not a str, ``ValueError`` if it holds
    NUL or lone surrogates."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    problem = prompt_problem(prompt)
    if problem is not None:
        raise ValueError(problem)
    return prompt


def workspace_path_problem(path: str) -> str | None:
    """Why ``path`` is not a usable workspace path, or ``None``."""
    if not path.strip():
        return "the workspace path must not be blank"
    if re.search(f"[{_CONTROL}]", path):
        return "the workspace path must not contain control characters"
    if _has_lone_surrogate(path):
        return "the workspace path must not contain lone surrogates"
    return None


def validate_workspace_path(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a usable workspace path."""
    problem = workspace_path_problem(path)
    if problem is not None:
        raise ValueError(problem)


def validate_submission(
    session_id: object, prompt: object, run_id: object, attachments: Iterable[object]
) -> None:
    """Raise the typed error for the first thing wrong with a submission; else nothing.

    An empty ``run_id`` means "mint one"; any other must follow the identifier rule.
    """
    validate_session_id(session_id)
    text = validate_prompt(prompt)
    checked: list[Attachment] = []
    if attachments:  # most submissions have none: no loop, and no list walked for nothing
        for attachment in attachments:
            if not isinstance(attachment, Attachment):
                raise TypeError(f"attachments must be Attachment values, got {type(attachment)}")
            checked.append(attachment)
    if not text.strip() and not any(a.has_text() for a in checked):
        raise EmptyPrompt()
    if run_id != "":
        validate_run_id(run_id)


def labels_problem(labels: object) -> str | None:
    """What is wrong with ``labels`` under the label rule, or ``None`` when they keep it.

    At most :data:`MAX_LABELS`; each key matches :data:`LABEL_KEY_PATTERN`; each value is a
    str of at most :data:`MAX_LABEL_VALUE_LENGTH` characters without NUL or lone surrogates.
    """
    if not isinstance(labels, Mapping):
        return f"labels must be a mapping of str to str, got {type(labels).__name__}"
    if len(labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels, got {len(labels)}"
    for key, value in labels.items():
        # fullmatch: `$` would also match before a trailing newline.
        if not isinstance(key, str) or _LABEL_KEY.fullmatch(key) is None:
            return f"label key {key!r} must be 1 to 64 characters of [A-Za-z0-9_.-]"
        if not isinstance(value, str):
            return f"label {key!r}: the value must be a str, got {type(value).__name__}"
        if len(value) > MAX_LABEL_VALUE_LENGTH:
            return f"label {key!r}: the value is longer than {MAX_LABEL_VALUE_LENGTH} characters"
        if "\x00" in value or _has_lone_surrogate(value):
            return f"label {key!r}: the value must not contain NUL or lone surrogates"
    return None


def validate_labels(labels: object) -> None:
    """Raise ``InvalidLabels`` if ``labels`` break the label rule (see :func:`labels_problem`)."""
    if not labels:
        return
    problem = labels_problem(labels)
    if problem is not None:
        raise InvalidLabels(problem)
