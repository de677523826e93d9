"""Phrasing families for the question grammar (data only; the composition lives in questions.py).

Two disjoint families: ``train`` phrasings are used to build connector-training questions;
``heldout`` phrasings are never used in training and only serve evaluation/test questions, so
that a connector which memorised token positions instead of meaning is caught (see the phrasing
probe in the Llamdex notes: 3 fixed templates -> held-out age error of 20 years).

Besides templates, the ``train`` family builds half of its value clauses *procedurally*: the label
and the value joined by 1-3 random connector words in either order (``forward_words`` /
``backward_words``), so the encoder learns "the value next to this label" rather than a handful of
fixed connecting phrases (measured: with templates only, the real titanic test questions' "it
amounts to 0" was read as 8-10 parents/children). The held-out family has no procedural clauses,
and no connector word occurs in its fixed text (tested).

Placeholders: ``{label}`` (a feature label), ``{value}`` (a rendered value, with unit),
``{answer}`` (a yes/no word), ``{a_subject}`` / ``{subject}``, ``{q}`` / ``{ql}`` (the target
question, as written / with a lower-case first letter). Fixed text must never contain digits,
and held-out fixed text must never occur in train output (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["train", "heldout"]
FAMILIES: tuple[Family, ...] = ("train", "heldout")


@dataclass(frozen=True)
class PhrasingFamily:
    """One family of phrasings; every tuple is a pool the generator samples from uniformly."""

    numeric: tuple[str, ...]  # clause templates for int/float: {label}, {value}
    category: tuple[str, ...]  # clause templates for categories: {label}, {value}
    boolean: tuple[str, ...]  # clause templates for bools: {label}, {answer}
    yes_no: tuple[tuple[str, str], ...]  # (word for true, word for false); value words, may be shared
    separators: tuple[str, ...]  # between clauses of an inline body
    styles: tuple[str, ...]  # body layouts: inline | sentences | dashes | stars
    leadins: tuple[str, ...]  # text before an inline or list body
    openers: tuple[str, ...]  # first sentence
    distractors: tuple[str, ...]  # irrelevant sentences
    closers: tuple[str, ...]  # wrap the target question
    forward_words: tuple[str, ...] = ()  # procedural clauses "{label} w1 [w2 [w3]] {value}"
    backward_words: tuple[str, ...] = ()  # procedural clauses "{value} w1 [w2] {label}"


TRAIN = PhrasingFamily(
    numeric=(
        "{label}: {value}", "{label} is {value}", "{label} = {value}", "{label} of {value}",
        "its {label} is {value}", "{label} was {value}", "{label} equals {value}",
        "{label} recorded as {value}", "{value} for {label}", "{label} stands at {value}",
        "{label} - {value}", "with {label} at {value}",
    ),
    category=(
        "{label}: {value}", "{label} is {value}", "{label} = {value}", "its {label} is {value}",
        "{label} was {value}", "{label} recorded as {value}", "{label} - {value}",
        "{value} for {label}", "{label} listed as {value}",
    ),
    boolean=("{label}: {answer}", "{label}? {answer}", "{label} = {answer}", "{label} - {answer}",
             "{label} is {answer}", "{label} was {answer}", "{label} recorded as {answer}", "{answer} for {label}",
             "{label} marked {answer}"),
    yes_no=(("yes", "no"), ("true", "false")),
    separators=(", ", "; ", " | ", " & ", " and ", " - ", " ~ ", " :: ", " · ", " • ", " ... ", " also ", " || ",
                ", and ", " ; then "),
    styles=("inline", "inline", "inline", "sentences", "dashes", "bullets", "arrows"),
    leadins=("", "", "Details: ", "The facts are these: ", "What we know: ", "Profile: ",
             "Here is the data: "),
    openers=(
        "", "", "Consider {a_subject}.", "Here is {a_subject}.", "I have a question about {a_subject}.",
        "Let me describe {a_subject}.", "This is about one {subject}.", "Look at this {subject}.",
    ),
    distractors=(
        "The weather was mild that day.", "I found this in an old spreadsheet.",
        "My colleague is curious about it too.", "This came up during a team meeting.",
        "The notes were typed up quickly.", "Thanks in advance for your help.",
        "It is part of a larger study.", "I am asking purely out of interest.",
        "The information was collected a long time ago.", "The coffee machine was broken this morning.",
        "We are reviewing several similar cases.",
    ),
    closers=("{q}", "{q}", "Question: {q}", "Based on this, {ql}", "Given these facts, {ql}", "So, {ql}",
             "My question: {q}"),
    forward_words=("registered", "listed", "noted", "shown", "logged", "measured", "marked", "reported", "set",
                   "put", "valued", "totalling", "around", "roughly", "exactly", "approximately", "currently",
                   "officially", "was", "of", "with", "on", "by", "has", "so", "then", "now", "reading", "value",
                   "number", "level", "count", "total", "entered", "written", "recorded", "shows", "sits", "lies",
                   "near", "stated", "declared", "known", "basically", "just", ":", "-", "=", "~", "->",
                   "at", "to", "is", "the", "gives", "holds", "equals", "hits", "reaching", "standing", "showing",
                   "being", "field", "item", "data", "stat", "metric", "noted as", "equal to", "set at", "(", ")"),
    backward_words=("for", "under", "as its", "being its", "is its", "was its", "noted", "listed", "logged",
                    "marks", "of", "on", "by", "->", "=", "regarding", "makes up the", "goes with",
                    "belongs to", "recorded under", "entered under", "for the", "as the", "which is the",
                    "that is its", "being the", "is the", "stands for", "was the", "in the field", "as value of",
                    "the", "its"),
)

HELDOUT = PhrasingFamily(
    numeric=("{label} comes in at {value}", "{value} is the figure given for {label}",
             "as for {label}, it amounts to {value}"),
    category=("{label} happens to be {value}", "{value} is what the file says about {label}",
              "concerning {label}, the entry reads {value}"),
    boolean=("concerning {label}, the entry reads {answer}", "{label} (checked): {answer}"),
    yes_no=(("yes", "no"),),
    separators=(" / ", " + "),
    styles=("inline", "stars"),
    leadins=("Key data points, briefly: ", "Summary of the file: "),
    openers=("Imagine {a_subject} that nobody has reviewed yet.", "Someone told me about {a_subject}."),
    distractors=("My neighbour keeps a diary about such things.",
                 "The printer jammed twice while I was copying this.",
                 "A friend asked me about it over lunch."),
    closers=("Taking everything above into account, {ql}", "Here is what I would like to know. {q}"),
)

PHRASINGS: dict[str, PhrasingFamily] = {"train": TRAIN, "heldout": HELDOUT}
PROCEDURAL_SHARE = 0.5
"""Share of numeric/category clauses built from connector words, in families that have them."""
