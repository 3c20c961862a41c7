"""Per-prompt choice among language-specific GlueNets, with an offline language detector.

The official demo detects the prompt's language with an online translation service and picks the
GlueNet trained for it. Here the detector is py3langid (a naive-Bayes model shipped inside the
package, no network), restricted to the languages the router actually holds, which makes short
prompts far more reliable than open-set detection.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import X2IError

logger = logging.getLogger(__name__)

T = TypeVar("T")
AUTO = "auto"


class LanguageRoutingError(X2IError):
    """No GlueNet fits the requested or detected language."""


# Open-set detection above this probability names a language confidently enough to refuse a prompt
# no connected GlueNet understands; below it, short prompts are too ambiguous and the closed-set
# choice among connected languages is used instead.
CONFIDENT_OTHER_LANGUAGE = 0.6


@functools.lru_cache(maxsize=16)
def _identifier(languages: frozenset[str] | None):  # -> py3langid LanguageIdentifier
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if languages is not None:
        known = set(identifier.nb_classes)
        usable = sorted(languages & known)
        if len(usable) < len(languages):
            logger.warning("language detector does not know %s; choose them manually", sorted(languages - known))
        identifier.set_languages(usable or None)
    return identifier


def has_letters(text: str) -> bool:
    """True when ``text`` contains at least one letter of any script (something to detect)."""
    return any(unicodedata.category(ch).startswith("L") for ch in text)


DETECTION_CHARS = 2000


def detect_language(text: str, candidates: frozenset[str]) -> tuple[str, float]:
    """Language of ``text``: one of ``candidates``, or another language when that is confident.

    Returns the ISO 639-1 code and its normalised probability.
    """
    if len(candidates) == 1:
        return next(iter(candidates)), 1.0
    # The encoders read the first 77 tokens: the language of what they read is what matters, and a
    # bounded sample keeps a pasted book from holding the server.
    text = text[:DETECTION_CHARS]
    language, probability = _identifier(None).classify(text)
    if language in candidates or probability >= CONFIDENT_OTHER_LANGUAGE:
        return str(language), float(probability)
    language, probability = _identifier(candidates).classify(text)
    return str(language), float(probability)


@dataclass(frozen=True)
class Route(Generic[T]):
    language: str
    target: T
    reason: str


class GlueNetRouter(Generic[T]):
    """Holds GlueNets keyed by ISO 639-1 language code and picks one per prompt.

    ``language`` forces one GlueNet (manual override); ``"auto"`` detects it. Prompts without any
    letters (the empty negative prompt, for instance) cannot be detected and use
    ``fallback_language``, which defaults to the first GlueNet given.
    """

    def __init__(self, entries: Mapping[str, T], language: str = AUTO, fallback_language: str | None = None) -> None:
        if not entries:
            raise LanguageRoutingError("the GlueNet router needs at least one GlueNet connected")
        self.entries = dict(entries)
        self.language = language
        self.fallback_language = fallback_language or next(iter(self.entries))
        for name, code in (("language", language), ("fallback language", self.fallback_language)):
            if code != AUTO and code not in self.entries:
                raise LanguageRoutingError(self._missing_message(code, f"the router's {name} is set to"))

    @property
    def languages(self) -> frozenset[str]:
        return frozenset(self.entries)

    def _missing_message(self, code: str, why: str) -> str:
        have = ", ".join(sorted(self.entries))
        return (
            f"{why} '{code}', but no GlueNet for '{code}' is connected (connected: {have}). "
            f"Connect a GlueNet trained for '{code}' or choose one of: {have}."
        )

    def route(self, text: str) -> Route[T]:
        if self.language != AUTO:
            return Route(self.language, self.entries[self.language], "manual")
        if not has_letters(text):
            return Route(self.fallback_language, self.entries[self.fallback_language], "fallback (nothing to detect)")
        language, probability = detect_language(text, self.languages)
        if language not in self.entries:
            raise LanguageRoutingError(self._missing_message(language, "the prompt looks like"))
        return Route(language, self.entries[language], f"detected (p={probability:.2f})")
