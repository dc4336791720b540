"""What is valid, defined once: class names, class count, the unknown threshold, record bounds,
a stored embedding's values.

Config, MQTT, the web page, import and the store's own load all check with these functions, so a
name the config refuses can never arrive over MQTT or in an import file, and the other way round.
Each check returns the normalized value or raises RuleError with one line meant for the user.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Iterable, Optional, Union

import numpy as np

MAX_CLASSES = 8
"""Classes a box knows at most (buttons plus classes taught over MQTT or the web page)."""
MAX_NAME = 32
"""Characters in a class name at most."""
RESERVED = ("unknown",)
"""Names that mean 'none of the classes' and so cannot name a class."""
NAME_PUNCTUATION = " _-"
MAX_MARKS = 3
"""Combining marks on one letter at most (scripts need two or three; a pile of them is not text)."""
MAX_RECORD_SECONDS = 60.0
"""Longest timed recording a command may ask for."""
MAX_RECORD_COUNT = 500
"""Most samples one counted recording may ask for."""
RECORD_IDLE_SECONDS = 20.0
RECORD_IDLE_GAPS = 4.0
"""A counted recording ends when it learned nothing for RECORD_IDLE_SECONDS or RECORD_IDLE_GAPS
times the longest gap between its samples so far, whichever is longer (a still scene, no
pictures coming). Longer than the Scratch teach block's own wait (15 s or 3 gaps,
edge/static/scratch/edge-box.js), so the block lets go first and says why."""
THRESHOLD_AUTO = "auto"
MAX_FEATURE = 1e4
"""Largest size of one number of a stored embedding. A model's features are activations
(MobileNetV2's 0 to 6); an imported 3e38 overflowed the head's sums and left a class that could
never match."""


class RuleError(ValueError):
    """A value that breaks one of the box's rules; the message is one line for the user."""


def show(value: Any, limit: int = 40) -> str:
    """A value as a short, printable, escaped text for error messages (never raw control chars)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def class_name(value: Any) -> str:
    """A class name: 1..MAX_NAME letters, digits, space, _ or -, no outer spaces, not reserved;
    returned in Unicode's composed form (NFC).

    Letters and digits are Unicode ones (a class may be called "Äpfel", "猫" or "टोपी"), with the
    combining marks that many scripts (Devanagari, Thai, Tamil; an accent typed as two
    characters) write after a letter; but nothing that changes how text is shown (bidi
    overrides, escapes, control or format characters) and no MQTT wildcard or path separator can
    get in. NFC: "café" typed with a separate accent (as macOS may send it) is the same name.
    """
    if not isinstance(value, str):
        raise RuleError(f"a class name must be a text, got {show(value)}")
    value = unicodedata.normalize("NFC", value)
    if not value:
        raise RuleError("a class name must not be empty")
    if len(value) > MAX_NAME:
        raise RuleError(f"class names are at most {MAX_NAME} characters, got {show(value)}")
    after_letter, marks = False, 0
    for char in value:
        kind = unicodedata.category(char)
        if _invisible(char):
            raise RuleError(f"class names may use letters, digits, space, _ and -, got {show(value)}")
        if kind in ("Mn", "Mc") and after_letter and marks < MAX_MARKS:
            marks += 1      # a mark on the letter or digit before it
            continue
        after_letter, marks = char.isalnum() and kind[0] in "LN", 0
        if not (after_letter or char in NAME_PUNCTUATION):
            raise RuleError(f"class names may use letters, digits, space, _ and -, got {show(value)}")
    if value != value.strip():
        raise RuleError(f"class names must not start or end with a space, got {show(value)}")
    if value.casefold() in RESERVED:
        raise RuleError(f"{value.casefold()!r} is reserved for 'none of the classes'; pick another name")
    return value


def _invisible(char: str) -> bool:
    """Marks and letters Unicode says to show as nothing (Default_Ignorable_Code_Point):
    variation selectors, the combining grapheme joiner, Mongolian and Khmer ones, the Hangul
    fillers. "cat" and "cat" + U+FE0F (or U+3164) would be two classes that look the same, and
    "unknown" + U+FE0F would pass for the reserved name."""
    code = ord(char)
    return code in (0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0) or 0x17B4 <= code <= 0x17B5 \
        or 0x180B <= code <= 0x180F or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF


def new_class_name(value: Any, existing: Iterable[str], replacing: Optional[str] = None) -> str:
    """A class name that is valid and not yet used (ignoring case) by another of `existing`."""
    name = class_name(value.strip() if isinstance(value, str) else value)
    for other in existing:
        if other != replacing and other.casefold() == name.casefold():
            raise RuleError(f"a class named {other!r} exists already (names are compared ignoring case)")
    return name


def class_names(values: Any) -> list:
    """A whole list of class names: each valid, none twice (ignoring case), at most MAX_CLASSES."""
    if not isinstance(values, (list, tuple)):
        raise RuleError(f"expected a list of class names, got {show(values)}")
    if len(values) > MAX_CLASSES:
        raise RuleError(f"at most {MAX_CLASSES} classes, got {len(values)}")
    names: list = []
    for value in values:
        names.append(new_class_name(value, names))
    return names


def find_class(value: Any, known: Iterable[str]) -> str:
    """The known class a user means by `value` (case-insensitive), or RuleError naming the known ones."""
    known = list(known)
    if not isinstance(value, str) or not value.strip():
        raise RuleError("a class name is required")
    wanted = unicodedata.normalize("NFC", value.strip()).casefold()
    for name in known:
        if unicodedata.normalize("NFC", name).casefold() == wanted:
            return name
    listing = ", ".join(known) if known else "none yet"
    raise RuleError(f"unknown class {show(value.strip())} (classes: {listing})")


LATEST_TIME = 32503680000.0
"""3000-01-01 in Unix seconds: a sample's time past it (or before 1970) is no clock's."""


def is_timestamp(value: Any) -> bool:
    """A sample's time: Unix seconds from 1970 to LATEST_TIME (the gallery shows it as a date)."""
    return is_number(value) and 0 <= value < LATEST_TIME


def is_number(value: Any) -> bool:
    """A finite JSON/YAML number that is not a bool."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an int too large for a float: JSON allows any number of digits
        return False


def threshold(value: Any) -> Union[str, float]:
    """The unknown threshold: "auto" or a cosine score from -1 to 1 (a numeric text is accepted)."""
    given = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == THRESHOLD_AUTO:
            return THRESHOLD_AUTO
        try:
            value = float(text)
        except ValueError:
            value = None
    if not is_number(value) or not -1.0 <= value <= 1.0:
        raise RuleError(f"threshold must be 'auto' or a number from -1 to 1, got {show(given)}")
    return float(value)


def record_seconds(value: Any) -> float:
    if not is_number(value) or not 0 < value <= MAX_RECORD_SECONDS:
        raise RuleError(f"'seconds' must be a number above 0 and at most {MAX_RECORD_SECONDS:g}")
    return float(value)


def record_count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RECORD_COUNT:
        raise RuleError(f"'count' must be a whole number from 1 to {MAX_RECORD_COUNT}")
    return value


def vectors_problem(vectors: np.ndarray) -> Optional[str]:
    """What makes stored embeddings unusable (NaN, infinite, or beyond MAX_FEATURE), or None."""
    if not np.isfinite(vectors).all():
        return "NaN or infinite values"
    if vectors.size and float(np.abs(vectors).max()) > MAX_FEATURE:
        return f"values beyond {MAX_FEATURE:g} (no model's features are that large)"
    return None
