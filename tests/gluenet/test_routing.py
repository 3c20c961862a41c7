"""Choosing a language-specific GlueNet per prompt, offline."""

from __future__ import annotations

import pytest

from x2i.gluenet import GlueNetRouter, LanguageRoutingError

OFFICIAL_DEMO_PROMPTS = {
    "zh": "下午的花园的印象派绘画",
    "fr": "Peinture impressionniste d'un jardin d'après-midi",
    "es": "Pintura impresionista de un jardín de tarde",
    "ja": "午後の庭の印象派絵画",
    "it": "Pittura impressionista di un giardino pomeridiano",
}
RELEASED = {code: f"gluenet_{code}" for code in OFFICIAL_DEMO_PROMPTS}


@pytest.mark.parametrize("code", sorted(OFFICIAL_DEMO_PROMPTS))
def test_official_demo_prompts_reach_their_gluenet(code):
    route = GlueNetRouter(RELEASED).route(OFFICIAL_DEMO_PROMPTS[code])
    assert (route.language, route.target) == (code, f"gluenet_{code}")
    assert route.reason.startswith("detected")


@pytest.mark.parametrize(("text", "code"), [("un chat", "fr"), ("gatto nero", "it"), ("flou, mauvaise qualité", "fr"), ("ネコ", "ja")])
def test_short_prompts_are_decided_among_connected_languages(text, code):
    assert GlueNetRouter(RELEASED).route(text).language == code


def test_manual_language_overrides_detection():
    route = GlueNetRouter(RELEASED, language="es").route(OFFICIAL_DEMO_PROMPTS["ja"])
    assert (route.language, route.reason) == ("es", "manual")


@pytest.mark.parametrize("text", ["", "   ", "1234, ::"])
def test_prompts_without_letters_use_the_fallback(text):
    router = GlueNetRouter({"it": "a", "fr": "b"})
    assert router.route(text).language == "it"
    assert GlueNetRouter({"it": "a", "fr": "b"}, fallback_language="fr").route(text).language == "fr"


def test_a_confidently_other_language_is_refused_with_the_fix():
    router = GlueNetRouter({"fr": "a", "es": "b"})
    with pytest.raises(LanguageRoutingError, match=r"looks like 'de'.*connected: es, fr"):
        router.route("ein Hund im Park, Ölgemälde")


def test_a_single_gluenet_takes_every_prompt():
    assert GlueNetRouter({"fr": "a"}).route("ein Hund im Park, Ölgemälde").language == "fr"


def test_misconfigured_routers_fail_early():
    with pytest.raises(LanguageRoutingError, match="at least one GlueNet"):
        GlueNetRouter({})
    with pytest.raises(LanguageRoutingError, match="language is set to 'de'.*connected: fr"):
        GlueNetRouter({"fr": "a"}, language="de")


def test_language_is_detected_on_what_the_encoder_reads_in_bounded_time():
    from x2i.gluenet.routing import DETECTION_CHARS, detect_language

    french = "Peinture impressionniste d'un jardin d'après-midi, un chat assis sur un tapis rouge. "
    languages = frozenset({"fr", "zh"})
    assert detect_language(french * 100_000 + "下午的花园的印象派绘画" * 100_000, languages)[0] == "fr"
    assert detect_language("下午的花园的印象派绘画" * (DETECTION_CHARS // 10) + french * 1000, languages)[0] == "zh"
