"""Answer extraction and normalisation: find the final answer in a response and put it in a
canonical form (``extract_answer``, ``normalize_answer``, ``parse_number``, ``vote_key``).

The answer is the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``
    (nested braces allowed), else the last ``Answer: ...`` line (``extract="boxed"``, the
    default); ``extract="lenient"`` also takes "the answer is X" and the last number or math of
    the final paragraph.
"""

from __future__ import annotations

import re
from fractions import Fraction

from oprd_cli.errors import OprdError

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_\-]*(?:final[ \t]+)?answer[ \t]*(?:is)?[ \t]*[*_]*[ \t]*[:：][ \t]*(?P<ans>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_MINERVA_RE = re.compile(r"^the final answer is\s*(?P<ans>.+?)(?:\.\s*I hope it is correct\.?)?$", re.IGNORECASE)


def _balanced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == '{'``, or None if it never closes."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _clean_answer(ans: str) -> str:
    ans = ans.strip()
    for _ in range(3):
        before = ans
        ans = ans.strip().rstrip(".").strip().strip("*_").strip()
        if ans.startswith("$$") and ans.endswith("$$") and len(ans) >= 4:
            ans = ans[2:-2]
        elif ans.startswith("$") and ans.endswith("$") and len(ans) >= 2:
            ans = ans[1:-1]
        if ans.startswith("\\(") and ans.endswith("\\)"):
            ans = ans[2:-2]
        if ans.startswith("\\[") and ans.endswith("\\]"):
            ans = ans[2:-2]
        if ans == before:
            break
    return ans.strip()


EXTRACT_MODES = ("boxed", "lenient")
DEFAULT_EXTRACT = "boxed"

# lenient extraction: a math environment, else a bare number / simple fraction / percentage
_MATH_ENV = (r"\$\$(?P<dd>.+?)\$\$|(?<!\\)\$(?P<di>[^$\n]+?)(?<!\\)\$|\\\((?P<pp>.+?)\\\)"
             r"|\\\[(?P<bb>.+?)\\\]")
# (a number followed by "=" or an operator is a step of a computation, not its result)
_BARE_NUM = (r"(?<![\w.])(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*\\?%)?|[-+]?\.\d+)"
             r"(?![\d.]*\s*[=+*/^\u00d7\u00f7])")
_ANSWER_IS_RE = re.compile(r"\banswers?\b[^\n]{0,50}?(?:\bis\b|\bare\b|=|:)[^\n]{0,30}?(?:" + _MATH_ENV + "|"
                           + _BARE_NUM + ")", re.IGNORECASE)
_STATEMENT_RE = re.compile(_MATH_ENV + "|" + _BARE_NUM, re.DOTALL)


def _env_or_number(m: re.Match) -> str:
    for name in ("dd", "di", "pp", "bb", "num"):
        if m.group(name) is not None:
            return m.group(name)
    return ""


def _extract_lenient(text: str) -> str | None:
    """"The answer is X" (the last such phrase; X a math environment or a number), else the last math
    environment or number of the final paragraph (math-verify's unanchored fallback, kept to the
    final statement)."""
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        ans = _clean_answer(_env_or_number(m))
        if ans:
            return ans
    paragraphs = [b for b in re.split(r"\n[ \t]*\n", text) if b.strip()]
    if not paragraphs:
        return None
    for m in reversed(list(_STATEMENT_RE.finditer(paragraphs[-1]))):
        ans = _clean_answer(_env_or_number(m))
        if ans:
            return ans
    return None


def check_extract_mode(mode: str) -> str:
    if mode not in EXTRACT_MODES:
        raise OprdError(f"--extract must be one of {', '.join(EXTRACT_MODES)}, got {mode!r}")
    return mode


def extract_answer(text: str | None, mode: str = DEFAULT_EXTRACT) -> str | None:
    """The final answer of a response; None when there is none.

    ``mode="boxed"`` (default, the release's evaluation): the last complete ``\\boxed{}``/``\\fbox{}``,
    else the last ``Answer: ...`` line (Minerva's "The final answer is ..." included). Empty boxes
    (``\\boxed{}``, e.g. the echoed instruction) and a box cut off by the length limit are skipped in
    favour of the previous complete one.
    ``mode="lenient"``: as boxed, then "the answer is X" (the last such phrase), then the last math
    environment or number of the final paragraph ("So there are 70 apples." -> ``70``), the
    forms math-verify's own extraction also takes.
    """
    check_extract_mode(mode)
    if not text:
        return None
    ans = _extract_boxed(text)
    if ans is None and mode == "lenient":
        ans = _extract_lenient(text)
    return ans


def _extract_boxed(text: str) -> str | None:
    for m in reversed(list(_BOX_RE.finditer(text))):
        pos = m.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced(text, pos)
            if content is None:
                continue
        elif m.end() < len(text) and text[m.end()] in " \t":  # "\boxed 5"
            content = re.match(r"[^\s$]*", text[pos:]).group(0)
        else:
            continue
        content = _clean_answer(content)
        if content:
            return content
    lines = list(_ANSWER_LINE_RE.finditer(text))
    for m in reversed(lines):
        ans = _clean_answer(m.group("ans"))
        mm = _MINERVA_RE.match(ans)
        if mm:
            ans = _clean_answer(mm.group("ans"))
        if ans:
            return ans
    return None


# ============================================================================ fast exact / numeric check
_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|textit|mbox)\{(.*)\}$")
_SPACES_RE = re.compile(r"\\[,;:! ]|~|\s+")
_NUM_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac(?:\{([+-]?\d+)\}|(\d))(?:\{(\d+)\}|(\d))$")
_SLASH_RE = re.compile(r"^([+-]?)(\d+)/(\d+)$")
_DEGREE_RE = re.compile(r"\^\{?\\circ\}?|\\degree(?![A-Za-z])|\u00b0|\^\{\u00b0\}|\^\u00b0")


def canonical(ans: str) -> str:
    """Unicode forms LaTeX graders do not read: the minus sign, and the degree sign (``90°``) as ``^\\circ``."""
    return _DEGREE_RE.sub(lambda _m: "^\\circ", ans.replace("\u2212", "-"))


def normalize_answer(ans: str) -> str:
    """A cheap canonical string for exact comparison and vote grouping."""
    s = canonical(ans.strip())
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACES_RE.sub("", s)
    s = s.strip("$").rstrip(".")
    for _ in range(2):
        m = _WRAP_RE.match(s)
        if m and _balanced("{" + m.group(1) + "}", 0) == m.group(1):
            s = m.group(1)
    return s


def parse_number(ans: str) -> Fraction | None:
    """An exact value for plain numbers: ``025``, ``-3``, ``142.0``, ``1,000``, ``\\frac{1}{2}``, ``3/4``
    (a trailing degree sign is dropped: ``90^\\circ`` is 90, as math-verify reads it)."""
    s = normalize_answer(ans).removesuffix("^\\circ")
    if len(s) > 200:
        return None
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    try:
        if _NUM_RE.match(s):
            return Fraction(s)
        m = _FRAC_RE.match(s)
        if m:
            sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        else:
            m = _SLASH_RE.match(s)
            if m:
                sign, num, den = m.groups()
        if m:
            value = Fraction(int(num), int(den))
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def vote_key(ans: str) -> str:
    """The key majority voting groups answers by: the exact value of numbers, else the normalised text."""
    v = parse_number(ans)
    if v is not None:
        return f"num:{v}"
    return "str:" + normalize_answer(ans)
