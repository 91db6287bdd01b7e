"""Every user value has a checked range: SamplingParams and BeamSearchParams refuse what the sampler cannot use,
and errors echo only a short piece of the bad value."""

from __future__ import annotations

import pytest

from kvserve import BeamSearchParams, SamplingParams
from kvserve.sampling_params import MAX_BAD_WORDS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOKEN_ID_LIST
from kvserve.validation import brief, text_error, utf8_error

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_float_fields_refuse_nan_and_infinities(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("top_k", 2**70), ("top_k", 2**63), ("seed", 2**63), ("seed", -(2**63) - 1), ("max_tokens", 2**63), ("min_tokens", 2**63),
     ("n", 2**63), ("logprobs", 2**64), ("stop_token_ids", [2**63]), ("allowed_token_ids", [2**64]),
     ("logit_bias", {2**63: 1.0}), ("logit_bias", {"99999999999999999999999": 1.0}), ("logit_bias", {5: NAN})],
)
def test_integers_must_fit_int64(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_limits_that_fit_int64_are_accepted():
    params = SamplingParams(seed=2**63 - 1, max_tokens=2**63 - 1, min_tokens=5, top_k=-1, logit_bias={"7": 100.0})
    assert params.top_k == 0 and params.logit_bias == {7: 100.0}
    assert SamplingParams(seed=-(2**63)).seed_for_output(1) == (-(2**63) + 1) & (2**63 - 1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("stop", ["x"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS} strings"),
        ("stop", "x" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"),
        ("stop", ["ok", "bad \ud800"], "lone surrogate U\\+D800"),
        ("stop_token_ids", list(range(MAX_TOKEN_ID_LIST + 1)), f"at most {MAX_TOKEN_ID_LIST}"),
        ("bad_words", ["w"] * (MAX_BAD_WORDS + 1), f"at most {MAX_BAD_WORDS}"),
        ("bad_words", ["\udcff"], "valid Unicode"),
        ("ignore_eos", "yes", "true or false"),
        ("skip_special_tokens", 1, "true or false"),
    ],
)
def test_per_step_work_is_bounded(field, value, message):
    """Stop strings are searched and bad words matched every step: one request may not make every step slow."""
    with pytest.raises(ValueError, match=f"^{field} must be .*{message}"):
        SamplingParams(**{field: value})


def test_allowed_token_ids_are_deduplicated():
    assert SamplingParams(allowed_token_ids=[5, 3, 5, 3, 9]).allowed_token_ids == [3, 5, 9]


@pytest.mark.parametrize(
    "field, value", [("beam_width", 2**63), ("max_tokens", 2**64), ("length_penalty", NAN), ("length_penalty", INF)]
)
def test_beam_search_params_ranges(field, value):
    kwargs = {"beam_width": 2, "max_tokens": 4, field: value}
    with pytest.raises(ValueError, match=f"^{field} must be"):
        BeamSearchParams(**kwargs)


@pytest.mark.parametrize("value", ["x" * 1_000_000, list(range(1_000_000)), 10**5000, {"k": "v" * 1_000_000}],
                         ids=["long-string", "long-list", "huge-int", "nested"])
def test_errors_echo_at_most_about_200_characters_of_the_value(value):
    with pytest.raises(ValueError) as info:
        SamplingParams(stop=value)
    assert len(str(info.value)) < 400
    assert len(brief(value)) <= 220


def test_text_checks_find_surrogates_and_undecodable_bytes_anywhere():
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert utf8_error("fine ü ✓") is None
    assert utf8_error(undecodable) == "byte 0xe9 at character 3 is not valid UTF-8"
    assert "lone surrogate U+D800" in utf8_error("a\ud800")
    assert text_error({"a": [1, {"b": ["ok", "x\ud801"]}]}) is not None
    assert text_error({"k\udc80": 1}) is not None  # keys too
    assert text_error({"a": [1, 2.5, None, True, "ok"]}) is None
    deep: list = []
    for _ in range(100_000):  # deeper than the recursion limit
        deep = [deep]
    assert text_error(deep) is None
