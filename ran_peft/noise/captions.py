"""The caption attack of noisy upstream data: meaning-changing medical term swaps (laterality, organ, finding,
size, negation) that keep the sentence fluent."""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Mapping, Sequence

# Interchangeable terms: a term found in a caption is replaced by another member of its group, which keeps the
# sentence fluent but changes what it asserts. Canonical spelling here; matching ignores case.
MEDICAL_TERM_GROUPS: dict[str, tuple[str, ...]] = {
    "laterality": ("left", "right"),
    "vertical_position": ("upper", "lower"),
    "organ": ("lung", "liver", "kidney", "brain", "spleen", "pancreas", "heart", "thyroid", "bladder"),
    "organ_plural": ("lungs", "kidneys"),
    "organ_adjective": ("pulmonary", "hepatic", "renal", "cerebral", "cardiac", "splenic"),
    "joint": ("knee", "shoulder", "hip", "elbow", "ankle", "wrist"),
    "region": ("chest", "abdomen", "pelvis"),
    "modality": ("CT", "MRI", "X-ray", "ultrasound", "PET"),
    "focal_finding": ("nodule", "mass", "cyst", "lesion", "tumor", "abscess", "calcification"),
    "focal_finding_plural": ("nodules", "masses", "cysts", "lesions", "tumors", "calcifications"),
    "diffuse_finding": ("effusion", "hemorrhage", "consolidation", "pneumothorax", "edema", "atelectasis"),
    "bone_finding": ("fracture", "dislocation", "erosion"),
    "severity": ("mild", "moderate", "severe"),
    "size_word": ("small", "large"),
}
"""Groups of interchangeable medical terms: `substitute_medical_terms` swaps a term for another of its group."""

# Negation flips, phrase -> replacement (an empty replacement deletes the phrase). Longer phrases win over shorter
# ones at the same place, so "there is no" is flipped as a whole rather than as a bare "no".
NEGATION_SWAPS: dict[str, str] = {
    "shows no": "shows a",
    "shows a": "shows no",
    "shows an": "shows no",
    "there is no": "there is a",
    "there is a": "there is no",
    "there is an": "there is no",
    "no evidence of": "evidence of",
    "without": "with",
    "with": "without",
    "no": "",
}
"""Negation flips, phrase -> replacement (an empty replacement deletes the phrase), longest match first."""

# "with" is not negated after these words: "consistent without" is not English.
NEGATION_BLOCKED_AFTER: dict[str, tuple[str, ...]] = {
    "with": ("consistent", "compatible", "associated", "keeping", "along", "together", "filled", "treated"),
}

SIZE_FACTORS = (0.5, 2.0, 3.0)
_SIZE_UNITS = {"mm": "cm", "cm": "mm"}
# Prefixed to a caption holding no known term, so that every attacked caption still changes what it asserts.
FALLBACK_NEGATION = "No"


# ----------------------------------------------------------------------------------------------------------------
# Caption attack: medical term substitution
# ----------------------------------------------------------------------------------------------------------------


class _TermMatcher:
    """One compiled regex over a vocabulary's terms, negation phrases and sizes (`12 mm`, `1.5cm`)."""

    def __init__(self, term_groups: Mapping[str, Sequence[str]], negation_swaps: Mapping[str, str]):
        self.canonical: dict[str, str] = {}
        self.alternatives: dict[str, tuple[str, ...]] = {}
        for group, terms in term_groups.items():
            if len(terms) < 2:
                raise ValueError(
                    f"term group {group!r} needs at least two terms to swap between, got {terms!r}."
                )
            for term in terms:
                key = _normalise(term)
                if key in self.canonical or key in negation_swaps:
                    raise ValueError(f"term {term!r} appears twice in the vocabulary (group {group!r}).")
                self.canonical[key] = term
                self.alternatives[key] = tuple(other for other in terms if _normalise(other) != key)
        self.negations = {_normalise(phrase): replacement for phrase, replacement in negation_swaps.items()}
        phrases = sorted([*self.canonical, *self.negations], key=len, reverse=True)
        alternation = "|".join(self._phrase_pattern(phrase) for phrase in phrases)
        self.pattern = re.compile(
            r"(?<![\w.])(?P<number>\d+(?:\.\d+)?)(?P<gap>\s?)(?P<unit>mm|cm)(?!\w)"
            + (rf"|(?<![\w-])(?P<term>{alternation})(?![\w-])" if alternation else ""),
            re.IGNORECASE,
        )

    @staticmethod
    def _phrase_pattern(phrase: str) -> str:
        blocked = "".join(rf"(?<!{re.escape(word)}\s)" for word in NEGATION_BLOCKED_AFTER.get(phrase, ()))
        return blocked + r"\s+".join(re.escape(word) for word in phrase.split())


def _normalise(phrase: str) -> str:
    return " ".join(phrase.lower().split())


_DEFAULT_MATCHER: _TermMatcher | None = None


def _default_matcher() -> _TermMatcher:
    global _DEFAULT_MATCHER
    if _DEFAULT_MATCHER is None:
        _DEFAULT_MATCHER = _TermMatcher(MEDICAL_TERM_GROUPS, NEGATION_SWAPS)
    return _DEFAULT_MATCHER


def _styled(matched: str, canonical: str, replacement: str, sentence_start: bool) -> str:
    """`replacement` written in the case style of `matched` ("LEFT" -> "RIGHT", "Left" -> "Right")."""
    if not replacement:
        return replacement
    letters = [c for c in matched if c.isalpha()]
    if matched != canonical and len(letters) >= 2 and all(c.isupper() for c in letters):
        return replacement.upper()
    # A canonical acronym ("CT") says nothing about case unless it opens a sentence.
    if matched[:1].isupper() and (matched != canonical or sentence_start):
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _indefinite_article(word: str) -> str:
    """'a' or 'an' before `word`, by how it is spoken ("an MRI", "an X-ray", "a CT", "an 8 mm", "a unilateral")."""
    if not word:
        return "a"
    if word[0].isdigit():
        integer = re.match(r"\d+", word).group()
        return "an" if integer.startswith("8") or integer in ("11", "18") else "a"
    acronym = len(word) >= 2 and (word[:2].isupper() or word[1] == "-")
    if acronym:
        return "an" if word[0].upper() in "AEFHILMNORSX" else "a"
    lowered = word.lower()
    if lowered[0] in "aeio" or (
        lowered[0] == "u" and not lowered.startswith(("uni", "use", "usu", "ure", "uro"))
    ):
        return "an"
    return "a"


def _with_article(article: str, like: str) -> str:
    return (
        article.upper()
        if like.isupper() and len(like) > 1
        else (article.capitalize() if like[:1].isupper() else article)
    )


_TRAILING_ARTICLE = re.compile(r"(?<!\w)(a|an)(\s+)$", re.IGNORECASE)
_LEADING_ARTICLE = re.compile(r"(?<!\w)(a|an)$", re.IGNORECASE)


def _new_size(number: str, unit: str, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return number, _SIZE_UNITS[unit.lower()] if unit.islower() else _SIZE_UNITS[unit.lower()].upper()
    value = float(number)
    decimals = len(number.split(".")[1]) if "." in number else 0
    for factor in rng.sample(SIZE_FACTORS, len(SIZE_FACTORS)):
        scaled = round(value * factor, decimals)
        text = f"{scaled:.{decimals}f}" if decimals else str(max(1, int(scaled)))
        if text != number:
            return text, unit
    return number, _SIZE_UNITS[unit.lower()]


def _substitute_terms(caption: str, rng: random.Random, matcher: _TermMatcher) -> tuple[str, list[str]]:
    """The caption with a random non-empty subset of its known terms swapped, and the list of swaps made."""
    matches = list(matcher.pattern.finditer(caption))
    if not matches:
        return _fallback_negation(caption)
    chosen = [match for match in matches if rng.random() < 0.5]
    if not chosen:
        chosen = [rng.choice(matches)]
    pieces: list[str] = []
    changes: list[str] = []
    position = 0
    capitalise_next = False
    for match in chosen:
        start, end = match.span()
        untouched = caption[position:start]
        if capitalise_next and untouched:
            untouched, capitalise_next = untouched[:1].upper() + untouched[1:], False
        pieces.append(untouched)
        matched = match.group()
        written = "".join(pieces).rstrip()
        sentence_start = not written or written[-1] in ".!?"
        if match.group("number") is not None:
            number, unit = _new_size(match.group("number"), match.group("unit"), rng)
            replacement = f"{number}{match.group('gap')}{unit}"
        else:
            key = _normalise(matched)
            if key in matcher.negations:
                replacement = _styled(matched, key, matcher.negations[key], sentence_start)
                if not replacement:
                    # Deleting "no": drop the space after it, and keep the sentence capitalised.
                    end += len(caption[end:]) - len(caption[end:].lstrip())
                    capitalise_next = matched[:1].isupper()
                else:
                    replacement = _fix_inner_article(replacement, caption[end:])
            else:
                canonical = matcher.canonical[key]
                replacement = _styled(
                    matched, canonical, rng.choice(matcher.alternatives[key]), sentence_start
                )
        swapped_term = match.group("number") is not None or _normalise(matched) not in matcher.negations
        if replacement and swapped_term:
            _fix_preceding_article(pieces, replacement)
        if capitalise_next and replacement:
            replacement, capitalise_next = replacement[:1].upper() + replacement[1:], False
        pieces.append(replacement)
        changes.append(f"{matched}->{replacement or '(deleted)'}")
        position = end
    rest = caption[position:]
    if capitalise_next:
        rest = rest[:1].upper() + rest[1:]
    pieces.append(rest)
    return "".join(pieces), changes


def _fix_preceding_article(pieces: list[str], replacement: str) -> None:
    """Make an "a"/"an" right before a swapped term agree with the new term ("a mass" -> "an effusion")."""
    written = "".join(pieces)
    found = _TRAILING_ARTICLE.search(written)
    if found is None:
        return
    article = _with_article(_indefinite_article(replacement), found.group(1))
    pieces[:] = [written[: found.start()] + article + found.group(2)]


def _fix_inner_article(replacement: str, following: str) -> str:
    """A negation flip that ends in an article ("shows a") agrees with the next word ("shows an effusion")."""
    found = _LEADING_ARTICLE.search(replacement)
    next_word = re.match(r"\s*([\w-]+)", following)
    if found is None or next_word is None:
        return replacement
    return replacement[: found.start()] + _with_article(
        _indefinite_article(next_word.group(1)), found.group(1)
    )


def _fallback_negation(caption: str) -> tuple[str, list[str]]:
    stripped = caption.lstrip()
    if not stripped:
        raise ValueError("cannot attack an empty caption: there is no statement to change.")
    first = stripped.split()[0]
    # Lower-case the old first word unless it is an acronym ("CT", "MRI") or a single letter.
    if not (len(first) > 1 and first[:2].isupper()):
        stripped = stripped[:1].lower() + stripped[1:]
    return f"{caption[: len(caption) - len(caption.lstrip())]}{FALLBACK_NEGATION} {stripped}", [
        f"(no known term)->{FALLBACK_NEGATION}"
    ]


def substitute_medical_terms(
    caption: str,
    rng: random.Random,
    *,
    term_groups: Mapping[str, Sequence[str]] | None = None,
    negation_swaps: Mapping[str, str] | None = None,
) -> str:
    """Change what a caption asserts by swapping medical terms for others of the same kind.

    Each known term (laterality, anatomy, modality, finding, severity), negation phrase and size (`12 mm`) is
    swapped with probability 1/2, and at least one always is; matches are whole words, ignore case, and the
    replacement keeps the original's case ("Left" -> "Right", "LEFT" -> "RIGHT"). A neighbouring "a"/"an" is made
    to agree. A caption holding no known term gets the negation "No" in front. Deterministic given `rng`'s state.
    Usable as the `rewriter` of :func:`add_adversarial_noise` (e.g. with `functools.partial` and a vocabulary of
    your own: `term_groups` like :data:`MEDICAL_TERM_GROUPS`, `negation_swaps` like :data:`NEGATION_SWAPS`).
    """
    if term_groups is None and negation_swaps is None:
        matcher = _default_matcher()
    else:
        matcher = _TermMatcher(
            MEDICAL_TERM_GROUPS if term_groups is None else term_groups,
            NEGATION_SWAPS if negation_swaps is None else negation_swaps,
        )
    return _substitute_terms(caption, rng, matcher)[0]


def _describe_rewrite(before: str, after: str) -> list[str]:
    """Word-level edits between two captions, as "old->new" items (for rewriters that report nothing)."""
    old, new = before.split(), after.split()
    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            changes.append(f"{' '.join(old[i1:i2]) or '(inserted)'}->{' '.join(new[j1:j2]) or '(deleted)'}")
    return changes or ["whitespace changed"]
