"""Chinese-aware text hygiene: what the training text keeps, what the dedup key and the language filter see.

NFKC on the text itself would turn ``你好，世界！（测试）`` into ``你好,世界!(测试)`` and ``x²`` into ``x2``. So the text
only gets full-width letters and digits and the ideographic space (U+3000) mapped to ASCII, runs of spaces compressed
and line ends trimmed — outside fenced code blocks, which stay byte for byte. NFKC, case folding and whitespace folding
are applied only to the dedup key. The language of a text is read from character classes with code blocks left out
(an answer that is mostly code is judged by its prose).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Lang = Literal["zh", "en", "other"]

# Full-width digits and Latin letters → ASCII; U+3000 → space. Full-width punctuation (，！（）：) is kept.
_FULLWIDTH = {cp: cp - 0xFEE0 for lo, hi in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))
              for cp in range(lo, hi + 1)}
_FULLWIDTH[0x3000] = 0x20
_WIDE = re.compile(r"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000]")  # any character _FULLWIDTH maps
# Common full-width marks and their NFKD forms (ASCII): NFKC of a text with them replaced is the same, as its NFKD
# is; and with them gone NFKC's quick check passes on most Chinese text, instead of a full decomposition.
_NFKD_FIRST = tuple((c, unicodedata.normalize("NFKD", c)) for c in "，！？：；（）％～…\u3000")
_FENCE = re.compile(r"(^```.*?(?:^```[^\n]*$|\Z))", re.M | re.S)
_SPACES = re.compile(r"[ \t]{2,}")
# Runs of each character class: script() counts characters by runs (Han: runs replaced by a space each), which
# makes far fewer objects than one match per character.
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]+")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]+")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_OTHER_LETTER = re.compile(r"[^\W\d_A-Za-z\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\u31f0-\u31ff"
                           r"\u1100-\u11ff\u3130-\u318f\uac00-\ud7af\U00020000-\U0002ebef]+")
_INLINE_CODE = re.compile(r"`[^`\n]+`")


def _split_code(text: str) -> list[tuple[bool, str]]:
    """[(is_code, piece)] with fenced ``` blocks (an unclosed fence runs to the end) as code pieces."""
    pieces, last = [], 0
    for m in _FENCE.finditer(text):
        pieces.append((False, text[last:m.start()]))
        pieces.append((True, m.group(0)))
        last = m.end()
    pieces.append((False, text[last:]))
    return [(code, p) for code, p in pieces if p]


def _clean_prose(piece: str) -> str:
    if _WIDE.search(piece):
        piece = piece.translate(_FULLWIDTH)
    if "  " in piece or "\t" in piece:  # runs of [ \t] never cross a line end: one pass over the piece, if any
        piece = _SPACES.sub(" ", piece)
    return "\n".join([line.rstrip() for line in piece.split("\n")])


def normalise(text: str) -> str:
    """The training text: full-width letters/digits and U+3000 → ASCII, spaces compressed, line ends trimmed,
    line structure and fenced code kept, surrounding blank space removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "```" not in text:  # no fence, one prose piece
        return _clean_prose(text).strip()
    return "".join(p if code else _clean_prose(p) for code, p in _split_code(text)).strip()


def dedup_key(text: str) -> str:
    """What two texts must share to count as duplicates: NFKC, case-folded, all whitespace folded to one space."""
    for wide, narrow in _NFKD_FIRST:
        if wide in text:
            text = text.replace(wide, narrow)
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass(frozen=True)
class Script:
    """Counts of writing units in a text's prose: Han characters, Latin words, kana/hangul and other letters."""
    han: int
    latin_words: int
    kana_hangul: int
    other: int

    @property
    def total(self) -> int:
        return self.han + self.latin_words + self.kana_hangul + self.other

    @property
    def han_share(self) -> float:
        return self.han / self.total if self.total else 0.0

    @property
    def lang(self) -> Lang:
        """The language these counts make (see :func:`classify`)."""
        if self.total == 0:
            return "other"
        if self.kana_hangul >= max(1, 0.05 * self.total) or self.other > self.han + self.latin_words:
            return "other"
        return "zh" if self.han >= self.latin_words else "en"


def _prose(text: str) -> str:
    """The text without its fenced code blocks, inline code spans blanked."""
    if "```" in text:
        text = "".join(p for code, p in _split_code(text) if not code)
    return _INLINE_CODE.sub(" ", text) if "`" in text else text


def script(text: str) -> Script:
    prose = _prose(text)
    han = 0
    if not prose.isascii():  # Han runs → one space each: what is left is shorter to scan, and no two words join
        rest, runs = _HAN.subn(" ", prose)
        prose, han = rest, len(prose) - len(rest) + runs
    if prose.isascii():  # no kana, hangul or other letters: ASCII letters are Latin, digits and _ are not letters
        return Script(han=han, latin_words=len(_LATIN_WORD.findall(prose)), kana_hangul=0, other=0)
    return Script(han=han, latin_words=len(_LATIN_WORD.findall(prose)), kana_hangul=_chars(_KANA_HANGUL, prose),
                  other=_chars(_OTHER_LETTER, prose))


def _chars(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def classify(text: str, dataset_lang: str | None = None) -> Lang:
    """zh / en / other. A dataset's own language tag wins (`zh`, `zh-CN`, `zh-TW` → zh); otherwise Japanese kana or
    Korean hangul make a text `other`, Han characters outnumbering Latin words make it `zh`, Latin words alone `en`."""
    if dataset_lang:
        tag = dataset_lang.lower()
        return "zh" if tag.startswith("zh") else "en" if tag.startswith("en") else "other"
    return script(text).lang
