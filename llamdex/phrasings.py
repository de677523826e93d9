"""Phrasing data: the training grammar (:data:`TRAIN`) and the old held-out family (:data:`HELDOUT`).

The **training grammar** is what connector-training questions are composed from
(:mod:`llamdex.grammar`). It is deliberately wide -- many ways to connect a label to its value in
either order, count phrases ("no siblings", "a parent"), bool phrasings that only negate ("no
housing loan", "without a loan"), unknown
values, records and key=value lines, narrative with pronouns, distractor sentences and fake
fields with numbers -- because the encoder must learn *which value belongs to which label* in
phrasings it never saw. Every connector between a label and a value is in a finite list
(:func:`forward_connectors` / :func:`backward_connectors` enumerate them), so a test can prove that
the validation and test families (``llamdex/*_family.json``) share no template and no connector
phrase with it.

:data:`HELDOUT` is the *old* held-out family (3 numeric, 3 category, 2 bool templates) that the
accuracy tables before issue 16 were measured on; it is kept, unchanged, only to report those
numbers beside the new ones (the training grammar shares no phrase with it either).

Placeholders in the training pools: ``{label}``, ``{value}``, ``{count}``/``{noun}``, ``{answer}``,
``{phrase}``, ``{subject}``/``{a_subject}``, ``{n}`` (a random number in distractors), ``{q}``/``{ql}``
(the target question, as written / lower-cased first letter). Fixed text never contains digits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

Family = Literal["train", "heldout"]
FAMILIES: tuple[Family, ...] = ("train", "heldout")


# ---------------------------------------------------------------------------------------------- training
FORWARD_BASE = (
    ": ", " : ", " = ", "=", " - ", " -- ", " was ", " of ", " at ", " equals ", " stands at ",
    " recorded as ", " listed as ", " totals ", " totalling ", " reads ", " shows ", " sits at ", " registered at ",
    " noted as ", " set to ", " given as ", " measured at ", " logged as ", " entered as ", " marked as ",
    " around ", " ~ ", " -> ", " => ", " > ", " :: ", " | ", " @ ", " (value) ", " which is ",
    " that is ", " being ", " reported as ", " put at ", " estimated at ", " on record as ", " known to be ",
    " said to be ", " shown as ", " stated as ", " written as ", " counted as ", " declared as ", " filed as ",
    " described as ", " worth ", " valued at ", " amounting to ", " coming to ", " adding up to ", " set at ",
    " fixed at ", " pegged at ", " rated ", " graded ", " of just ", " of only ", " of nearly ", " of about ",
    " of exactly ", " of some ", " in the amount of ", " with a reading of ", " with a value of ", ", i.e. ",
    " specifically ", " namely ", " (about) ", " (exact) ",
)
FORWARD_HEADS = ("is", "was", "stood", "sat", "ran", "measured", "totalled", "showed", "read", "hit", "came out",
                 "worked out", "ended up", "is currently", "was recorded", "is listed", "is given", "is set",
                 "was put", "is noted", "is shown", "remains", "seems", "looks like", "appears")
FORWARD_TAILS = ("", " at", " around", " about", " roughly", " exactly", " as", " close to", " just", " nearly",
                 " some", " precisely", " approximately", " almost")
BACKWARD_BASE = (
    " for ", " as ", " as the ", " as its ", " as their ", " in ", " on ", " of ", " under ",
    " - ", ": ", " was the ", " being the ", " being its ", " is its ", " was its ", " which is the ",
    " that is the ", " recorded as ", " listed as the ", " noted for ", " logged under ", " entered under ",
    " filed under ", " (", " ~ ", " -> ", " <- ", " = ", " re ", " goes with ", " belongs to ",
    " stands for ", " marks the ", " makes up the ", " in the field ", " as value of ", " counting as ",
    " given for ", " reported for ", " registered for ", " shown for ", " stated for ", " written for ",
    " known as the ", " by way of ", " towards ", " against ",
)
HEDGES = ("probably", "I think", "I believe", "most likely", "apparently", "reportedly", "as far as I know",
          "to my knowledge", "if I remember right", "I'm fairly sure", "we were told", "they told us",
          "the file says", "my notes say", "presumably", "supposedly", "I reckon", "last I checked", "hmm,",
          "let me check...")
"""Words people put between a question's label and its answer ("housing loan? probably yes"): the
pointer must look past them to the value, not to a nearer literal of another field. They hold no
literal (no number, yes/no, negation or article)."""
HEDGE_JOINS = (": {hedge} ", "? {hedge} ", ", {hedge}, ")
LABEL_PREFIXES = ("", "", "", "the ", "its ", "their ", "with ", "with a ", "and ", "having ", "whose ", "plus ",
                  "also ", "then ", "a ", "and the ", "with the ", "while the ", "where the ", "also the ")
SUBJECT_REFS = ("The {subject}", "This {subject}", "They", "The {subject} in question", "Our {subject}",
                "This particular {subject}", "One {subject}")
NARRATIVE_VERBS = ("had", "has", "showed", "came with", "was noted with", "was on file with", "carried",
                   "was described with", "turned up with", "was listed with")
COUNT_CLAUSES = (
    "{count} {noun}", "had {count} {noun}", "{count} {noun} in total", "{noun}: {count}",
    "{noun} = {count}", "{count} {noun} along", "and {count} {noun}", "{count} {noun} at the time",
    "has {count} {noun}", "having {count} {noun}", "{count} {noun} listed", "{count} {noun} noted",
    "together with {count} {noun}", "accompanied only by {count} {noun}", "there were {count} {noun}",
    "{count} {noun}, it seems", "counting {count} {noun}", "{count} {noun} on record", "{noun} - {count}",
)
# an age written after the person it belongs to ("a man of 40", "a girl of four"): for features whose
# units say "years old" (llamdex.grammar._is_age); {person} is gender-neutral (the row's sex is its own
# feature) -- the schema's subject, or a word that fits the age
PERSON_OF = ("{person} of {n}", "{person} aged {n}", "aged {n}", "{person}, {n}", "{person} of about {n}",
             "{person} of just {n}")
PERSON_WORDS = ("person", "individual", "soul")
AGE_WORDS = ((13, ("child", "kid", "youngster")), (20, ("teenager", "youngster", "young person")),
             (200, ("adult", "grown-up")))
BOOL_ANSWER = (
    "{label}: {answer}", "{label} {answer}", "{label}? {answer}", "{label} = {answer}", "{label}={answer}",
    "{answer} on {label}", "{label} - {answer}", "{label}: {answer}, it says",
    "{label} was {answer}", "{answer} to {label}", "{label} -> {answer}",
    "{label} marked {answer}", "{label} answered {answer}", "{label}? - {answer}",
    "{answer} ({label})", "{label} set to {answer}",
)
BOOL_FALSE = ("[no] {label}", "[not] {label}", "[without] {label}", "[never] had {label}", "does [not] have {label}",
              "does[n't] have {label}", "{label}: [none]", "[no] {label} at all", "has [no] {label}",
              "[not] with {label}", "{label}? [none]", "[never] any {label}", "[no] sign of {label}",
              "{label} [not] present")
# a phrase standing alone: a bool's own phrase, or a numeric phrase stating several features at once
BOOL_PHRASE = ("{phrase}", "{phrase}, apparently", "and {phrase}", "{phrase} too", "also {phrase}",
               "they say {phrase}", "{phrase} as well", "it seems {phrase}")
CATEGORY_BARE = ("{value}", "a {value} one", "{value}, as it happens", "{value} too", "and {value}",
                 "also {value}", "({value})", "{value} as well", "listed as {value}", "noted: {value}")
UNSTATED = (
    "{label}: unknown", "unknown {label}", "{label} is unknown", "{label} not given", "{label}: not recorded",
    "{label} n.a.", "{label}: ?", "no info on {label}", "no data for {label}", "{label} left blank",
    "not sure about {label}", "{label}: -", "{label} (not known)", "no {label} recorded", "{label} not stated",
    "{label}: none recorded", "cannot say the {label}", "{label} was not noted", "{label}: missing",
    "{label} - no data", "the {label} is not on file", "{label}: blank", "no record of {label}",
    "don't know the {label}",
)
SEPARATORS = (", ", ", ", "; ", " | ", " & ", " and ", " - ", " ~ ", " :: ", " · ", " • ", " ... ", " also ",
              " || ", ", and ", " ; then ", ", plus ", " / ", ". ", " + ", ",  ", " -- ", " also, ", ", while ")
LIST_MARKS = ("-", "*", "•", ">", "+", "#", "·")
LEADINS = ("", "", "", "Details: ", "The facts are these: ", "What we know: ", "Profile: ", "Here is the data: ",
           "Data: ", "Info: ", "Notes: ", "In short: ", "Particulars: ", "Record: ", "Fields: ", "Summary: ")
OPENERS = (
    "", "", "", "Consider {a_subject}.", "Here is {a_subject}.", "I have a question about {a_subject}.",
    "Let me describe {a_subject}.", "This is about one {subject}.", "Look at this {subject}.",
    "Take {a_subject} like this.", "A quick one about {a_subject}.", "Help me with {a_subject}.",
    "I need your view on {a_subject}.", "Question about {a_subject}.", "Regarding {a_subject}:",
    "There is {a_subject} I want to ask about.", "Suppose we have {a_subject}.", "New case:",
    "Hi! I'm curious about {a_subject}.", "Hello, quick question.", "Hey there.", "Good morning.",
)
DISTRACTORS = (
    "The weather was mild that day.", "I found this in an old spreadsheet.", "My colleague is curious about it too.",
    "This came up during a team meeting.", "The notes were typed up quickly.", "Thanks in advance for your help.",
    "It is part of a larger study.", "I am asking purely out of interest.", "The information was collected a long time ago.",
    "The coffee machine was broken this morning.", "We are reviewing several similar cases.",
    "My sister is {n}.", "I have looked at {n} of these so far.", "The file was on page {n}.",
    "There were {n} other records in the box.", "Her brother was {n} at the time.", "His friend paid {n} for lunch.",
    "It took {n} minutes to type this.", "Room {n} was where we kept the papers.", "The meeting is at {n}.",
    "I counted {n} typos in the original.", "Our office has {n} desks.", "She mentioned it {n} times.",
    "He wrote this on day {n} of the project.", "My neighbour owns {n} cats.", "Box number {n} held the originals.",
    "The survey had {n} questions.", "It was printed in {year}.", "We started this in {year}.",
    "No one else has asked yet.", "A colleague of hers checked it twice.", "His notes are messy.",
    "Nobody is sure where it came from.", "I'm not an expert, so bear with me.",
)
FAKE_LABELS = ("room number", "shoe size", "page", "file number", "floor", "number of pets", "height in cm",
               "weight in kg", "row", "batch", "visit count", "case number", "form version", "desk",
               "phone extension", "queue position", "locker", "reference", "folder", "shift")
CLOSERS = ("{q}", "{q}", "{q}", "Question: {q}", "Based on this, {ql}", "Given these facts, {ql}", "So, {ql}",
           "My question: {q}", "Q. {q}", "Now, {ql}", "Tell me: {ql}", "What's your call? {q}", "{q} Thanks!",
           "Please answer: {q}", "{q} Just one word.", "In one word: {ql}", "Quick check: {ql}", "Well, {ql}",
           "Any idea? {q}", "{q} Thank you.")
STYLES = ("inline", "inline", "sentences", "list", "record", "terse", "narrative", "narrative", "chat", "csv")
YES_NO = (("yes", "no"), ("Yes", "No"), ("true", "false"), ("YES", "NO"), ("yeah", "nope"))
UNSTATED_SHARE = (0.0, 0.3)  # per question, the share of features left out or written as unknown, drawn uniformly
UNKNOWN_PHRASE_SHARE = 0.35  # of the unstated features, the share written with an UNSTATED phrase


LEFT_OUT = (" is ", " is the ", " for the ", " near ", " was about ",  # the validation family's
            " around ", " as the ", " at ", " entered under ", " for ", " given as ", " recorded as ", " stood at ")
"""Connectors the grammar would compose but never writes, because a held-out family uses them (a
held-out family shares no connector phrase with training; tested). The second line was removed
after the blind test family was written, when the disjointness test flagged them: the training
grammar was only ever *reduced* to keep away from it, never extended towards it."""


def forward_connectors() -> list[str]:
    """Every connector the grammar writes between a label and a following value (finite; for the
    disjointness tests): the base list and every head x tail composition, minus :data:`LEFT_OUT`."""
    composed = [f" {h}{t} " for h, t in itertools.product(FORWARD_HEADS, FORWARD_TAILS)]
    return [c for c in dict.fromkeys(FORWARD_BASE + tuple(composed) + tuple(hedged_connectors()))
            if c not in LEFT_OUT]


def hedged_connectors() -> list[str]:
    """A label's connector with a hedge before the value (": probably ", "? I think ", ", reportedly, ")."""
    return [j.format(hedge=h) for j, h in itertools.product(HEDGE_JOINS, HEDGES)]


def backward_connectors() -> list[str]:
    """Every connector the grammar writes between a value and a following label (minus :data:`LEFT_OUT`)."""
    return [c for c in BACKWARD_BASE if c not in LEFT_OUT]


@dataclass(frozen=True)
class PhrasingFamily:
    """The old (pre issue 16) template family format; every tuple is a pool sampled uniformly."""

    numeric: tuple[str, ...]
    category: tuple[str, ...]
    boolean: tuple[str, ...]
    yes_no: tuple[tuple[str, str], ...]
    separators: tuple[str, ...]
    styles: tuple[str, ...]
    leadins: tuple[str, ...]
    openers: tuple[str, ...]
    distractors: tuple[str, ...]
    closers: tuple[str, ...]


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
"""The old held-out family, unchanged (its accuracy numbers are reported beside the new family's)."""
