"""Numbers in answers: the one grammar by which a numeric target is accepted and a generation is read.

The stream loader accepts a numeric task's target only if it is exactly one number of this grammar
(`number_problem`), and the numeric scorer reads the gold and the prediction with the same grammar
(`final_number`), so a target is scored as exactly the number the loader accepted. Before issue 20
the loader checked `float(text.replace(",", ""))` and the scorer had its own pattern: "1e3" loaded
as 1000 and was scored as 3, "1_000" as 0, "1,23" as 23.

A number (`NUMBER`), as GSM8K references and lm-eval's gsm8k filters write them:

- an optional sign `-` or `+`, then an optional `$`: `-3`, `+3`, `$72`, `-$5`;
- ASCII digits, either plain (`1000`, `007`) or grouped by commas in threes (`1,000`, `12,345,678`);
  a comma anywhere else ends the number (`1,2,3` is three numbers, `1,23` two);
- an optional decimal part, a `.` and at least one digit (`2.5`); a final `.` is a sentence end
  (`18.` is 18);
- an optional `%`, a unit like `$`: `50%` is 50, not 0.5.

Not numbers here, and refused as targets with the form to write instead: scientific notation
(`1e3`), `_` digit separators (`1_000`), a decimal comma or a misplaced comma (`1,23`), a bare
fraction (`.5`), `inf`/`nan`, non-ASCII digits or minus signs. Python's `float()` accepts several of
these, lm-eval's gsm8k extraction does not; a generation containing `1e3` is read as 1 and 3, as
lm-eval reads it.

Values are exact decimals (`Decimal`): `72`, `72.0` and `$72.00` are one number.
"""

from __future__ import annotations

import re
from decimal import Decimal

NUMBER = r"[-+]?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?%?"
NUMBER_RE = re.compile(NUMBER)
_WHOLE_RE = re.compile(r"\s*(" + NUMBER + r")\s*")
# GSM8K's answer line, "#### 72". Same line only: "####" then a newline and a number is not an answer.
FINAL_RE = re.compile(r"####[ \t]*(" + NUMBER + ")")
ACCEPTED_FORMS = "72, -3, 2.5, 1,000, $72, 50%"


def plain(number: str) -> str:
    """A matched number as a plain decimal string: "$1,234.50" -> "1234.50", "+5%" -> "5"."""
    return number.replace(",", "").replace("$", "").replace("%", "").lstrip("+")


def parse_number(text: str) -> Decimal | None:
    """The value of a text that is exactly one number (surrounding whitespace allowed), else None."""
    whole = _WHOLE_RE.fullmatch(text)
    return Decimal(plain(whole.group(1))) if whole else None


def number_problem(text: str) -> str | None:
    """None if `text` is one number; otherwise why not, and what to write instead (one line)."""
    if parse_number(text) is not None:
        return None
    t = text.strip()
    scientific = re.fullmatch(r"[-+]?[0-9]+(\.[0-9]+)?[eE][-+]?([0-9]+)", t)
    if scientific:
        digits = f"{Decimal(t):f}" if len(scientific.group(2)) <= 2 else "the number in digits"
        return f"{t!r} is scientific notation, which the scorer does not read (1e3 is 1 and 3); write {digits}"
    if re.fullmatch(r"[-+]?[0-9][0-9_]*[0-9](\.[0-9]+)?", t):
        return f"{t!r} has '_' digit separators; write {t.replace('_', '')}"
    if re.fullmatch(r"[-+]?\$?[0-9][0-9,]*(\.[0-9]+)?", t):
        return (
            f"{t!r} is ambiguous: a comma only separates groups of three digits (1,000); "
            "write a decimal point (1.23) or no comma"
        )
    if re.fullmatch(r"[-+]?\.[0-9]+", t):
        return f"{t!r} has no digit before the point; write {t.replace('.', '0.', 1)}"
    return f"{t[:40]!r} is not one number (accepted forms: {ACCEPTED_FORMS})"


def find_numbers(text: str) -> list[str]:
    """Every number in a text, in order, as plain decimal strings."""
    return [plain(n) for n in NUMBER_RE.findall(text)]


def final_number(text: str) -> str:
    """The answer of a worked solution, as a plain decimal string ("" when it has none).

    The number on the first "#### n" line (GSM8K's answer marker, lm-eval's strict-match), else the
    last number of the text (lm-eval's flexible-extract). For a text that is one number, that number.
    """
    final = FINAL_RE.search(text)
    if final is not None:
        return plain(final.group(1))
    numbers = find_numbers(text)
    return numbers[-1] if numbers else ""
