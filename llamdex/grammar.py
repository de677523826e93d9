"""The training grammar: compositional connector-training questions from a row and its schema.

Deviation from the paper (documented): the paper paraphrases every row with Mistral-7B; we compose
questions instead (no LLM, deterministic by seed, cheap). What makes an encoder generalise to
phrasings it never saw is diversity (the probe in the Llamdex notes; docs/llamdex.md), so every
question draws independently:

* a **style**: inline clauses, one sentence per clause, a bulleted list, a record (one ``key: value``
  / ``key=value`` line per field), a CSV header + row, terse fragments, narrative prose with
  pronouns, or a chat message with hedges;
* per feature a **clause**: label and value joined by one of hundreds of connectors in either
  order (:func:`llamdex.phrasings.forward_connectors`), a count with its noun ("no siblings", "a
  parent"), a bare category ("a woman", "in steerage"), a bool as a yes/no word, as the schema's own
  phrase ("has a mortgage") or negated (false: "without a housing loan"); labels are descriptions,
  aliases or record keys;
* how each **value** is written (:class:`llamdex.render.ValueWriter`: digits, words, units, currency
  symbols, synonyms, ordinal forms);
* **unstated features**: a share of the features is left out or written as unknown ("age: unknown")
  and must be read as "not stated";
* **distractors**: irrelevant sentences, some with numbers or other people's pronouns ("Her
  brother was 12."), and fake fields ("room number 7") among the real ones;
* an opener, and a wrapper for the target question, which always comes last.

A gendered pronoun comes from the schema's own vocabulary: when a category's value has "he" or
"she" among its synonyms (titanic's ``sex``), narrative questions refer to the subject with it, and
sometimes the pronoun is the only place that value is written.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamdex.codec import is_missing, to_bool
from llamdex.phrasings import (
    AGE_WORDS,
    BOOL_ANSWER,
    BOOL_FALSE,
    BOOL_PHRASE,
    CATEGORY_BARE,
    CLOSERS,
    COUNT_CLAUSES,
    DISTRACTORS,
    FAKE_LABELS,
    LABEL_PREFIXES,
    LEADINS,
    LIST_MARKS,
    NARRATIVE_VERBS,
    OPENERS,
    PERSON_OF,
    PERSON_WORDS,
    SEPARATORS,
    STYLES,
    SUBJECT_REFS,
    UNKNOWN_PHRASE_SHARE,
    UNSTATED,
    UNSTATED_SHARE,
    YES_NO,
    backward_connectors,
    forward_connectors,
    hedged_connectors,
)
from llamdex.render import (
    LABEL,
    PRONOUNS,
    Question,
    ValueWriter,
    article,
    as_number,
    cap,
    lower_first,
    mark,
    sentence_case,
    unmark_all,
)
from llamdex.schema import FeatureSpec, TenantSchema
from llamdex.vocabulary import ONES, labels, number_words, phrase_values, unit_forms, value_phrases

_NEGATION = re.compile(r"\[([^\]]+)\]")  # BOOL_FALSE marks its negation word as [no]
_SHORT = frozenset({"record", "csv", "terse"})
_PRONOUNS = {"he": ("he", "his", "him"), "she": ("she", "her", "her")}


_FUNCTION_WORDS = frozenset("the and for with per from this that its not any".split())


def schema_phrases(schema: TenantSchema) -> frozenset[str]:
    """The phrases that *are* a schema's values or counted things -- count nouns, category names and synonyms
    (lower case) -- but not pronouns (other people's "her" in a distractor is intended) nor bare function or
    number words. Why: a distractor sentence that uses one ("My sister is 4." beside titanic's sibsp, whose
    nouns include sister) teaches the encoder to ignore that word where a user means the passenger's sister."""
    phrases = set()
    for f in schema.features:
        phrases |= {w.lower() for pair in f.nouns for w in pair}
        if f.type == "category":
            phrases |= {p.lower() for group in value_phrases(f) for p in group}
    return frozenset(p for p in phrases if len(p) > 2 and p not in _FUNCTION_WORDS and p not in ONES and p not in PRONOUNS)


def _words(text: str) -> str:
    """' w1 w2 … ' -- the lower-case words of ``text``, space-delimited for whole-word containment."""
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def speaks(text: str, phrases: frozenset[str]) -> bool:
    """Whether ``text`` (its ``{placeholders}`` ignored) contains one of ``phrases`` as whole words."""
    plain = _words(re.sub(r"\{\w+\}", "", text))
    return any(_words(p) in plain for p in phrases)


JOINT_SHARE = 0.5  # of rows where a phrase stating several features fits, the share that write it once for all


@dataclass(frozen=True)
class NumericPhrase:
    """What a numeric feature's phrase says: the value of every feature that lists it (several when
    shared: titanic's "travelling alone" is sibsp 0 and parch 0; bank's "never contacted before" is
    pdays -1 and previous 0), and the category values its words imply ("her husband": female)."""

    says: dict[int, float]
    implies: dict[int, str]


def numeric_phrases(schema: TenantSchema) -> dict[str, NumericPhrase]:
    """Lower-case phrase -> :class:`NumericPhrase`, over every numeric feature's ``synonyms``. Why: a
    phrase written for one feature must not contradict the rest of the row ("no family aboard" for
    sibsp beside three children), or the encoder learns to skip it where a user means it."""
    words: dict[str, set[tuple[int, str]]] = {}
    for i, f in enumerate(schema.features):
        if f.type == "category":
            for c, phrases in zip(f.categories or [], value_phrases(f), strict=True):
                for p in phrases:
                    words.setdefault(p.lower(), set()).add((i, c))
    table: dict[str, NumericPhrase] = {}
    for i, f in enumerate(schema.features):
        if f.type not in ("int", "float"):
            continue
        for v, phrases in zip(phrase_values(f), value_phrases(f), strict=True):
            for p in phrases:
                key = p.lower()
                if key not in table:
                    owners = [next(iter(words[w])) for w in re.findall(r"[\w']+", key) if len(words.get(w, ())) == 1]
                    table[key] = NumericPhrase(says={}, implies=dict(owners))
                table[key].says[i] = v
    return table


def _is_age(f: FeatureSpec) -> bool:
    """A numeric feature measured in years of life (its units include "years old" or "year-old")."""
    return f.type in ("int", "float") and bool({"years old", "year-old"} & {u.lower() for u in unit_forms(f)})


class TrainingGrammar:
    """Writes training questions about rows of one schema (see the module docstring)."""

    def __init__(self, schema: TenantSchema, rng: random.Random):
        self.schema, self.rng = schema, rng
        self.writer = ValueWriter(rng)
        self.forward, self.backward = forward_connectors(), backward_connectors()
        self.hedged = hedged_connectors()
        words = {w for f in schema.features for lab in labels(f) for w in lab.lower().split()}
        self.fake_labels = [x for x in FAKE_LABELS if not set(x.split()) & words]
        own = schema_phrases(schema)  # a distractor must not speak the schema's values ("My sister is 4." vs sibsp)
        self.distractors = [d for d in DISTRACTORS if not speaks(d, own)]
        self.gender = self._gender_feature()
        owners: dict[str, int] = {}
        for f in schema.features:
            for phrases in value_phrases(f) if f.type == "category" else []:
                for p in phrases:
                    owners[p.lower()] = owners.get(p.lower(), 0) + 1
        self._phrase_owners = owners
        self._numeric_phrases = numeric_phrases(schema)
        names = [f.name for f in schema.features]
        self._implying = {key: {names[j] for j in use.implies} for key, use in self._numeric_phrases.items()
                          if use.implies}  # phrase -> the features whose category its words imply
        self._avoid: frozenset[str] = frozenset()  # the current row's (see _phrases_for)
        self._stated: set[str] = set()

    def _gender_feature(self) -> tuple[int, dict[str, str]] | None:
        """(feature index, category -> 'he'/'she') for a category whose synonyms include those pronouns."""
        for i, f in enumerate(self.schema.features):
            if f.type != "category":
                continue
            found = {c: p for c, ps in zip(f.categories or [], value_phrases(f), strict=True)
                     for p in ps if p.lower() in _PRONOUNS}
            if len(set(found.values())) == 2:
                return i, found
        return None

    # ------------------------------------------------------------------------------------- compose
    def compose(self, row: Mapping[str, Any]) -> Question:
        """One training question about ``row`` (every feature present; None/NaN = unknown)."""
        rng = self.rng
        style = rng.choice(STYLES)
        short = style in _SHORT
        share = rng.uniform(*UNSTATED_SHARE)
        pron = None
        if self.gender is not None and style == "narrative":
            gi, mapping = self.gender
            value = row.get(self.schema.features[gi].name)
            if not is_missing(value) and value in mapping and rng.random() < 0.7:
                pron = (gi, _PRONOUNS[mapping[value]])
        clauses: dict[str, str] = {}
        stated: set[str] = set()
        for f in self.schema.features:
            if f.name not in row:
                raise ValueError(f"row: feature {f.name!r} is absent; fix: include it (None/NaN if unknown)")
        self._avoid, joint = self._phrases_for(row)
        self._stated = stated  # a phrase implying a category is written only once that feature is stated
        together: set[int] = set()
        if joint and style != "csv" and rng.random() < JOINT_SHARE:  # one phrase states several features
            phrase = rng.choice(joint)
            together = set(self._numeric_phrases[phrase.lower()].says)
            names = [self.schema.features[i].name for i in sorted(together)]
            clauses["+".join(names)] = rng.choice(BOOL_PHRASE).format(phrase=mark(tuple(sorted(together)), phrase))
            stated.update(names)
        for i, f in enumerate(self.schema.features):
            if i in together:
                continue
            value = row[f.name]
            if is_missing(value) or rng.random() < share:
                if pron is not None and i == pron[0]:
                    pron = None  # an unstated value is not said by a pronoun either
                if rng.random() < UNKNOWN_PHRASE_SHARE and style != "csv":
                    clauses[f.name] = rng.choice(UNSTATED).format(label=mark(i, self._label(f, short), LABEL))
                continue
            if pron is not None and i == pron[0] and rng.random() < 0.4:
                stated.add(f.name)  # the pronoun alone says it
                continue
            clauses[f.name] = self._clause(i, f, value, style, short)
            stated.add(f.name)
        parts = list(clauses.values())
        rng.shuffle(parts)
        if style not in ("csv", "record") and self.fake_labels and rng.random() < 0.3:
            for _ in range(rng.choice((1, 1, 2))):
                parts.insert(rng.randint(0, len(parts)), self._fake_clause())
        text = self._document(style, parts, pron, row)
        plain, value_spans, label_spans = unmark_all(text)
        names = [f.name for f in self.schema.features]
        spans = {names[i]: s for i, s in value_spans.items()}
        labs = {names[i]: s for i, s in label_spans.items()}
        return Question(text=plain, family="train", clauses={k: unmark_all(c)[0] for k, c in clauses.items()},
                        spans={k: v[0] for k, v in spans.items()}, label_spans={k: v[0] for k, v in labs.items()},
                        stated=frozenset(stated), value_spans=spans)

    def _phrases_for(self, row: Mapping[str, Any]) -> tuple[frozenset[str], list[str]]:
        """(phrases no single feature may write in this row, phrases that state several features and
        fit the row): a phrase fits when every feature it states holds its value and the category
        values its words imply are the row's."""
        def fits(use: NumericPhrase) -> bool:
            feats = self.schema.features
            return (all(not is_missing(row[feats[i].name]) and as_number(feats[i], row[feats[i].name]) == v
                        for i, v in use.says.items())
                    and all(row[feats[i].name] == c for i, c in use.implies.items()))
        avoid, joint = set(), []
        for key, use in self._numeric_phrases.items():
            if len(use.says) > 1 or not fits(use):
                avoid.add(key)
            if len(use.says) > 1 and fits(use) and not use.implies:
                joint.append(key)
        return frozenset(avoid), joint

    def _avoid_now(self) -> frozenset[str]:
        """The row's avoided phrases, plus those implying a category of a feature not (yet) stated: "her
        husband" beside an unstated sex would teach the encoder that "her" there says nothing."""
        return self._avoid | {key for key, implied in self._implying.items() if not implied <= self._stated}

    # -------------------------------------------------------------------------------------- clauses
    def _label(self, f: FeatureSpec, short: bool) -> str:
        if short and self.rng.random() < 0.6:
            return self.writer.key(f, short=True)
        return self.writer.label(f) if self.rng.random() < 0.85 else self.writer.key(f)

    def _value(self, i: int, f: FeatureSpec, value: Any, short: bool) -> str:
        if f.type == "category":
            return mark(i, self.writer.category(f, value, short))
        return mark(i, self.writer.number(f, value, unit_share=0.4 if short else 0.55, avoid=self._avoid_now()))

    def _joined(self, label: str, value: str, short: bool, plain: bool = False) -> str:
        """Label and value joined by a connector, in either order (``plain``: no clause-joining prefix,
        for sentences of their own)."""
        rng = self.rng
        if short and rng.random() < 0.6:
            return label + rng.choice((": ", "=", " = ", " ", ":", " - ", "\t")) + value
        if rng.random() < 0.7:
            prefix = rng.choice(("", "", "the ", "a ", "its ")) if plain else rng.choice(LABEL_PREFIXES)
            return prefix + label + rng.choice(self.forward) + value
        return value + rng.choice(self.backward) + rng.choice(("", "", "the ", "its ", "their ")) + label

    def _clause(self, i: int, f: FeatureSpec, value: Any, style: str, short: bool) -> str:
        """One feature's clause in ``style`` (value and label marked)."""
        rng = self.rng
        label = mark(i, self._label(f, short), LABEL)
        if style == "csv":  # 'key=value', split into a header and a row by _csv
            said = rng.choice(YES_NO)[0 if to_bool(value, f.name) else 1] if f.type == "bool" else None
            return label + "=" + (mark(i, said) if said else self._value(i, f, value, short))
        if f.type == "bool":
            return self._bool(i, f, value, label, short)
        if f.type == "int" and f.nouns and rng.random() < 0.5 and style != "csv":
            count, noun = self.writer.count(f, value)
            return rng.choice(COUNT_CLAUSES).format(count=mark(i, count), noun=noun)
        if _is_age(f) and rng.random() < 0.15 and style not in ("csv", "record"):
            return self._person_of(i, f, value)
        if f.type == "category" and rng.random() < 0.25 and style != "csv":
            text = self.writer.category(f, value, short)
            if self._phrase_owners.get(text.lower(), 0) == 1:  # only this feature has that word
                return rng.choice(CATEGORY_BARE).format(value=mark(i, text))
        return self._joined(label, self._value(i, f, value, short), short, style == "narrative")

    def _person_of(self, i: int, f: FeatureSpec, value: Any) -> str:
        """An age after the person it belongs to: "a passenger of 40", "a child aged four"."""
        rng = self.rng
        young = next(words for limit, words in AGE_WORDS if float(value) < limit)
        noun = rng.choice((self.schema.subject, rng.choice(PERSON_WORDS), rng.choice(young)))
        person = rng.choice((article(noun), "the " + noun, "this " + noun, "someone"))
        n = mark(i, self.writer.number(f, value, unit_share=0.0))
        return rng.choice(PERSON_OF).format(person=person, n=n)

    def _bool(self, i: int, f: FeatureSpec, value: Any, label: str, short: bool) -> str:
        rng = self.rng
        yes = to_bool(value, f.name)
        roll = rng.random()
        phrase = self.writer.phrase(f, value)
        if roll < 0.25 and phrase is not None:
            return rng.choice(BOOL_PHRASE).format(phrase=mark(i, phrase))
        if roll < 0.4 and not yes:  # a negation says 'false' ("without a housing loan")
            template = rng.choice(BOOL_FALSE)
            return _NEGATION.sub(lambda m: mark(i, m.group(1)), template).format(label=label)
        answer = mark(i, rng.choice(YES_NO)[0 if yes else 1])
        if roll < 0.6:
            return rng.choice(BOOL_ANSWER).format(label=label, answer=answer)
        if roll < 0.75:  # the answer after a hedge ("housing loan? probably yes")
            return label + rng.choice(self.hedged) + answer
        return self._joined(label, answer, short)

    def _fake_clause(self) -> str:
        rng = self.rng
        n = rng.choice((rng.randint(0, 20), rng.randint(0, 999), rng.randint(1000, 99999)))
        text = number_words(n) if n < 1000 and rng.random() < 0.25 else str(n)
        return self._joined(rng.choice(self.fake_labels), text, False)

    # ------------------------------------------------------------------------------------- documents
    def _document(self, style: str, parts: list[str], pron, row: Mapping[str, Any]) -> str:
        rng = self.rng
        subject = self.schema.subject
        subj = {"subject": subject, "a_subject": article(subject)}
        blocks: list[str] = []
        opener = rng.choice(OPENERS).format(**subj)
        if opener and style != "csv":
            blocks.append(opener)
        blocks += self._body(style, parts, pron, subj)
        for _ in range(rng.choice((0, 0, 1, 1, 2) if style != "narrative" else (1, 1, 2, 3))):
            blocks.insert(rng.randint(0, len(blocks)), self._distractor())
        q = self.schema.target.question.strip()
        blocks.append(cap(rng.choice(CLOSERS).format(q=q, ql=lower_first(q))))
        joiner = "\n" if style in ("list", "record", "csv") else rng.choice((" ", " ", "\n"))
        return sentence_case(joiner.join(b for b in blocks if b))

    def _distractor(self) -> str:
        rng = self.rng
        n = rng.choice((rng.randint(2, 12), rng.randint(13, 99), rng.randint(100, 999)))
        return rng.choice(self.distractors).format(n=number_words(n) if rng.random() < 0.2 else n,
                                              year=rng.randint(1890, 2025))

    def _body(self, style: str, parts: list[str], pron, subj: dict) -> list[str]:
        rng = self.rng
        if not parts:
            return []
        if style == "sentences":
            return [cap(p) + rng.choice((".", ".", "!", ";")) for p in parts]
        if style == "list":
            head = (rng.choice(LEADINS).strip() or "Details:").rstrip(":") + ":"
            mark_ = rng.choice(LIST_MARKS)
            return ["\n".join([head] + [f"{mark_} {p}" for p in parts])]
        if style == "record":
            head = rng.choice(("", "RECORD", "Entry:", "--- record ---", "ID: n/a", "[row]", "Profile"))
            sep = rng.choice(("\n", "\n", " | ", "; ", ", ", "  "))
            return [x for x in (head, sep.join(parts)) if x]
        if style == "csv":
            return [self._csv(parts)]
        if style == "terse":
            return [rng.choice((", ", " / ", "; ", " ", " | ")).join(parts) + rng.choice((".", "", " -"))]
        if style in ("narrative", "chat"):
            return self._prose(style, parts, pron, subj)
        sep = rng.choice(SEPARATORS)
        body = sep.join(parts)
        if len(parts) > 1 and sep == ", " and rng.random() < 0.5:
            body = ", ".join(parts[:-1]) + " and " + parts[-1]
        return [cap(rng.choice(LEADINS) + body) + "."]

    def _prose(self, style: str, parts: list[str], pron, subj: dict) -> list[str]:
        """Narrative sentences ('She had ...', 'Her ... was ...') or a chat message with hedges."""
        rng = self.rng
        gi = None
        if pron is not None:
            gi, (subj_p, poss_p, _) = pron
            refs = [subj_p, subj_p, subj_p]
            poss = poss_p
        else:
            refs = [r.format(**subj) for r in SUBJECT_REFS]
            poss = "their" if rng.random() < 0.5 else "its"
        if pron is not None:
            refs = [mark(gi, r) for r in refs]
            poss = mark(gi, poss)
        out = []
        for k, p in enumerate(parts):
            roll = 0.0 if k == 0 and pron is not None else rng.random()  # the pronoun is written at least once
            if style == "chat":
                hedge = rng.choice(("", "", "I think ", "apparently ", "maybe ", "I believe ", "so ", "oh, and ",
                                    "also ", "if I remember right, "))
                out.append(hedge + p)
                continue
            if roll < 0.35:
                out.append(cap(rng.choice(refs)) + " " + rng.choice(NARRATIVE_VERBS) + " " + p + ".")
            elif roll < 0.6:
                out.append(cap(poss) + " " + p + ".")
            else:
                out.append(cap(p) + ".")
        if style == "chat":
            lead = rng.choice(("So ", "Ok so ", "", "Well, ", "Right: "))
            return [lead + rng.choice((", ", " and ", "; ", ", ")).join(out) + rng.choice((".", "!", "..."))]
        return out

    def _csv(self, parts: list[str]) -> str:
        """A header line of keys and a line of values (csv clauses are 'key=value')."""
        pairs = [p.split("\x03=", 1) for p in parts]
        sep = self.rng.choice((",", ";", "\t", " | ", ", "))
        return sep.join(k + "\x03" for k, _ in pairs) + "\n" + sep.join(v for _, v in pairs)
