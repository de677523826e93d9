"""How values and features are written in words: one table shared by the readers and the writers.

The encoder *finds* values in a question (:mod:`llamdex.literals`) and the question grammars
*write* them (:mod:`llamdex.questions`, :mod:`llamdex.family`); both must agree on every way a
value can be written, so both read this module:

* numbers as words: cardinals 0..999,999 ("twenty-two", "two thousand and five"), ordinals
  ("3rd", "twenty-first"), and the few words that are counts ("once", "twice", "a dozen");
* a category or bool value through its own name, the schema's ``synonyms`` and derived forms:
  a category named like an ordinal or a number also reads as its digits and ordinal ("third" ->
  "3rd", "3"; "1" -> "one"), and every phrase with a small number in it also with the number
  in the other form ("class three" <-> "class 3"). A bool reads through yes/no words, negations and
  its own true/false phrases ("has a mortgage", "no housing loan"): its labels are *not* phrases of
  "true" (measured on bank validation questions: the label's tokens, present in nearly every bool
  clause, then drew the pointer away from the "no" next to them);
* a numeric feature's special values through ``synonyms`` ("-1": "never contacted before");
* a feature through its labels (description, aliases, name) and short record keys ("sibsp",
  "fixed_acidity", "fix. acid."); a unit through ``unit``, ``unit_aliases`` and, for currencies,
  its symbol.
"""

from __future__ import annotations

import re

from llamdex.schema import FeatureSpec

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL_ONES = ("zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
                "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth").split()
ORDINAL_TENS = "_ _ twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth".split()
CURRENCY_SYMBOLS = {"pound": "£", "pounds": "£", "gbp": "£", "euro": "€", "euros": "€", "eur": "€",
                    "dollar": "$", "dollars": "$", "usd": "$", "yen": "¥"}
COUNT_WORDS = {"once": 1, "twice": 2, "thrice": 3, "dozen": 12}


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999,999, e.g. 42 -> 'forty-two', 2005 -> 'two thousand and five'."""
    if not 0 <= n <= 999_999:
        raise ValueError(f"n: {n} is outside 0..999999; fix: use digits for this value")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("-" + ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return ONES[hundreds] + " hundred" + (" and " + number_words(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    tail = "" if not rest else (" and " if rest < 100 else " ") + number_words(rest)
    return number_words(thousands) + " thousand" + tail


def ordinal_digits(n: int) -> str:
    """1 -> '1st', 22 -> '22nd', 13 -> '13th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ordinal_words(n: int) -> str:
    """1 -> 'first', 21 -> 'twenty-first', 30 -> 'thirtieth' (0 <= n <= 99)."""
    if not 0 <= n <= 99:
        raise ValueError(f"n: {n} is outside 0..99; fix: use digits for this ordinal")
    if n < 20:
        return ORDINAL_ONES[n]
    tens, ones = divmod(n, 10)
    return ORDINAL_TENS[tens] if not ones else f"{TENS[tens]}-{ORDINAL_ONES[ones]}"


ORDINAL_VALUE = {ordinal_words(n): n for n in range(100)}
_SMALL = {w: i for i, w in enumerate(ONES)}
_SMALL_WORD = re.compile(r"\b(" + "|".join(sorted(ONES, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_SMALL_DIGIT = re.compile(r"(?<![\w.,])(1[0-9]|[0-9])(?![\w.,])")


def _number_of(name: str) -> tuple[int, bool] | None:
    """(number, is ordinal) a value name stands for: '3'/'three' -> (3, False), 'third'/'3rd' -> (3, True)."""
    text = name.strip().lower()
    if text.isdigit():
        return int(text), False
    if text in _SMALL:
        return _SMALL[text], False
    if text in ORDINAL_VALUE:
        return ORDINAL_VALUE[text], True
    m = re.fullmatch(r"(\d+)(st|nd|rd|th)", text)
    return (int(m.group(1)), True) if m else None


def _variants(phrase: str) -> list[str]:
    """The phrase, and with its small numbers (0..19) written the other way ('class three' <-> 'class 3');
    used on phrases of several words (a bare number keeps its own form)."""
    out = [phrase]
    swapped = _SMALL_WORD.sub(lambda m: str(ONES.index(m.group(1).lower())), phrase)
    if swapped != phrase:
        out.append(swapped)
    swapped = _SMALL_DIGIT.sub(lambda m: ONES[int(m.group(1))], phrase)
    if swapped != phrase:
        out.append(swapped)
    return out


def derived_forms(name: str) -> list[str]:
    """Number-like category names also read in their other forms: an ordinal as its digits and bare
    number ('third' -> '3rd', '3'), a cardinal as digits or words ('1' -> 'one', 'two' -> '2')."""
    parsed = _number_of(name)
    if parsed is None:
        return []
    n, ordinal = parsed
    forms = [ordinal_digits(n), str(n)] + ([ordinal_words(n)] if n <= 99 else []) if ordinal else \
        [str(n)] + ([ONES[n]] if n < len(ONES) else [])
    return [f for f in dict.fromkeys(forms) if f.lower() != name.lower()]


def category_code(name: str) -> str | None:
    """The bare number an ordinal category name stands for, as records code it ('third' -> '3', '2nd' -> '2');
    None for any other name."""
    parsed = _number_of(name)
    return str(parsed[0]) if parsed is not None and parsed[1] else None


def labels(f: FeatureSpec) -> list[str]:
    """What users call the feature: its description and aliases (the column name with spaces only if it
    has neither: 'has nurs' is a key, not words; see :func:`record_keys`)."""
    words = [x for x in (f.description, *f.aliases) if x]
    return list(dict.fromkeys(words or [f.name.replace("_", " ")]))


def record_keys(f: FeatureSpec) -> list[str]:
    """Keys a record may use for the feature: its name as written in the table ('sibsp', 'Sibsp',
    'fixed_acidity', 'Fixed acidity')."""
    return list(dict.fromkeys([f.name, f.name.capitalize(), f.name.replace("_", " ").capitalize()]))


def abbreviations(f: FeatureSpec) -> list[str]:
    """Shorter keys people abbreviate a field to: initials of multi-word names ('fsd'), a clipped last
    word ('fixed acid', 'bal', 'dura')."""
    parts = f.name.split("_")
    if len(parts) > 1:
        return ["".join(p[0] for p in parts), " ".join(parts[:-1] + [parts[-1][:4]])]
    return [f.name[:3], f.name[:4]] if len(f.name) > 5 else []


def unit_forms(f: FeatureSpec) -> list[str]:
    """Ways to write the feature's unit after a number (empty if it has none)."""
    return list(dict.fromkeys([f.unit, *f.unit_aliases])) if f.unit else []


def currency_symbol(f: FeatureSpec) -> str | None:
    """'£' for a feature measured in pounds, '€' for euros, '$' for dollars; else None."""
    for unit in unit_forms(f):
        symbol = CURRENCY_SYMBOLS.get(unit.lower())
        if symbol:
            return symbol
    return None


def _value_phrases(f: FeatureSpec) -> tuple[tuple[str, ...], ...]:
    if f.type == "category":
        assert f.categories is not None
        keys = list(f.categories)
    elif f.type == "bool":
        keys = ["false", "true"]
    else:
        keys = list(f.synonyms)
    table = f.phrases()
    out = []
    for key in keys:
        phrases = list(table.get(key, []))
        if f.type == "category":
            phrases += derived_forms(key)
        out.append(tuple(dict.fromkeys(v for p in phrases for v in (_variants(p) if " " in p else [p]))))
    # a phrase claimed by two values (e.g. a derived form equal to another value's synonym) is dropped from
    # the later one: one phrase, one meaning
    seen: set[str] = set()
    clean = []
    for phrases in out:
        keep = tuple(p for p in phrases if " ".join(p.replace("_", " ").lower().split()) not in seen)
        seen.update(" ".join(p.replace("_", " ").lower().split()) for p in keep)
        clean.append(keep)
    return tuple(clean)


def value_phrases(f: FeatureSpec) -> list[list[str]]:
    """Per value index, every phrase that writes it: category -> per category (name, synonyms, derived
    forms); bool -> [false phrases, true phrases]; numeric -> per ``synonyms`` key."""
    return [list(p) for p in _value_phrases(f)]


def phrase_values(f: FeatureSpec) -> list[float]:
    """The number each numeric ``synonyms`` key stands for (index-aligned with :func:`value_phrases`)."""
    return [float(k) for k in f.synonyms] if f.type in ("int", "float") else []
