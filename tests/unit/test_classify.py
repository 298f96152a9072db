"""Error classification (docs/errors.md): every table row with real provider bodies, garbage, redaction, streams."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyroute.core.classes import ErrorClass
from keyroute.core.classify import MESSAGE_LIMIT, Classification, classify, classify_stream_event

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
FAKE_KEY = "sk-test-SECRETKEY1234567890abcdef"

E = ErrorClass


def j(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def openai(message: str, type_: str | None, code: str | None) -> bytes:
    return j({"error": {"message": message, "type": type_, "param": None, "code": code}})


def anthropic(type_: str, message: str) -> bytes:
    return j({"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_011CSHoEeqs"})


def openrouter(code: int, message: str, **metadata: Any) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if metadata:
        err["metadata"] = metadata
    return j({"error": err, "user_id": "user_2abc"})


def google(code: int, status: str, message: str, details: list[Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return j({"error": err})


def zai(code: str, message: str) -> bytes:
    return j({"error": {"code": code, "message": message}})


# (status, headers, body, class, expected attributes)
CASES = [
    # --- RateLimited: 429, rate_limit_exceeded, resource_exhausted, plain 429 ---------------------------
    pytest.param(
        429,
        {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"},
        openai(
            "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
            "Used 29000, Requested 2000. Please try again in 2s.",
            "tokens",
            "rate_limit_exceeded",
        ),
        E.RATE_LIMITED,
        {"code": "rate_limit_exceeded", "reset_at": NOW + 360, "status": 429},
        id="openai-rate-limit-exceeded",
    ),
    pytest.param(
        429,
        {
            "retry-after": "12",
            "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:05Z",
            "anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:40Z",
        },
        anthropic(
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50,000 input tokens per minute.",
        ),
        E.RATE_LIMITED,
        {"code": "rate_limit_error", "reset_at": NOW + 40},
        id="anthropic-rate-limit-error",
    ),
    pytest.param(
        429,
        {},
        google(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38s"}],
        ),
        E.RATE_LIMITED,
        {"code": "RESOURCE_EXHAUSTED", "reset_at": NOW + 38},
        id="google-resource-exhausted-despite-billing-wording",
    ),
    pytest.param(
        429, {"Retry-After": "20"}, b"", E.RATE_LIMITED, {"reset_at": NOW + 20}, id="plain-429-empty"
    ),
    pytest.param(
        429, {}, b"Too Many Requests", E.RATE_LIMITED, {"message": "Too Many Requests"}, id="plain-429-text"
    ),
    pytest.param(
        429,
        {"Retry-After": "Fri, 15 Jan 2027 08:02:00 GMT"},
        b"<html><head><title>429 Too Many Requests</title></head><body>nginx</body></html>",
        E.RATE_LIMITED,
        {"reset_at": NOW + 120, "message": "429 Too Many Requests"},
        id="plain-429-html-date",
    ),
    pytest.param(
        429,
        {},
        zai("1302", "您的账户已达到速率限制\uff0c请您控制请求频率"),
        E.RATE_LIMITED,
        {"code": "1302"},
        id="zai-1302",
    ),
    pytest.param(429, {}, zai("1303", "API 请求频率过高"), E.RATE_LIMITED, {"code": "1303"}, id="zai-1303"),
    pytest.param(
        429,
        {"x-ratelimit-reset": "45"},
        j({"error": {"message": "You've been rate limited. Slow down.", "type": "rate_limit"}}),
        E.RATE_LIMITED,
        {"reset_at": NOW + 45},
        id="rate-limit-wording",
    ),
    pytest.param(
        429,
        {"retry-after": "30"},
        j({"error": {"message": "Your daily quota will refill shortly"}}),
        E.RATE_LIMITED,
        {},
        id="quota-wording-near-reset",
    ),
    pytest.param(
        429,
        {},
        openrouter(
            429,
            "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
            headers={
                "X-RateLimit-Limit": "50",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1800000060000",
            },
        ),
        E.RATE_LIMITED,
        {"reset_at": NOW + 60, "code": None},
        id="openrouter-own-limit-near-reset-credits-in-passing",
    ),
    # --- UsageLimit: usage_limit_reached, or quota/usage wording with a far reset ---------------------
    pytest.param(
        429,
        {},
        j(
            {
                "error": {
                    "type": "usage_limit_reached",
                    "message": "The usage limit has been reached",
                    "plan_type": "plus",
                    "resets_at": 1_800_007_200,
                    "resets_in_seconds": 7200,
                }
            }
        ),
        E.USAGE_LIMIT,
        {"code": "usage_limit_reached", "reset_at": NOW + 7200},
        id="codex-usage-limit-reached",
    ),
    pytest.param(
        429,
        {"retry-after": "3600"},
        j({"error": {"message": "You have reached your usage limit for this period."}}),
        E.USAGE_LIMIT,
        {"reset_at": NOW + 3600},
        id="usage-wording-far-reset",
    ),
    pytest.param(
        429,
        {"x-ratelimit-reset": str(int(NOW) + 6 * 3600)},
        j({"error": {"message": "Monthly quota exhausted for this key."}}),
        E.USAGE_LIMIT,
        {"reset_at": NOW + 6 * 3600},
        id="quota-wording-far-reset",
    ),
    pytest.param(
        429,
        {},
        openrouter(
            429,
            "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day",
            headers={
                "X-RateLimit-Limit": "50",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1800036000000",
            },
        ),
        E.USAGE_LIMIT,
        {"reset_at": NOW + 36000},
        id="openrouter-free-models-per-day-far-reset",
    ),
    pytest.param(
        429,
        {},
        zai("1308", "已达到 5 小时的使用上限。您的限额将在 2027-01-15 12:00:00 重置。"),
        E.USAGE_LIMIT,
        {"code": "1308"},
        id="zai-1308",
    ),
    # --- Billing: 402; 403/429 with credit/quota/balance/billing wording ------------------------------
    pytest.param(
        402,
        {},
        openrouter(402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits"),
        E.BILLING,
        {},
        id="openrouter-402",
    ),
    pytest.param(402, {}, b"", E.BILLING, {}, id="bare-402"),
    pytest.param(
        429,
        {"x-ratelimit-reset-requests": "1s"},
        openai(
            "You exceeded your current quota, please check your plan and billing details. For more "
            "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes.",
            "insufficient_quota",
            "insufficient_quota",
        ),
        E.BILLING,
        {"code": "insufficient_quota"},
        id="openai-insufficient-quota",
    ),
    pytest.param(
        429,
        {},
        zai("1113", "余额不足或无可用资源包,请充值。"),
        E.BILLING,
        {"code": "1113", "message": "余额不足或无可用资源包,请充值。"},
        id="zai-1113-balance",
    ),
    pytest.param(
        429, {}, b"Your account has insufficient funds.", E.BILLING, {}, id="429-insufficient-funds-text"
    ),
    pytest.param(
        429,
        {},
        j({"error": {"message": "Quota exceeded for this project."}}),
        E.BILLING,
        {},
        id="429-quota-wording-no-reset",
    ),
    pytest.param(
        403,
        {},
        j({"error": {"message": "Your credit balance is too low. Please add credits to continue."}}),
        E.BILLING,
        {},
        id="403-credit-balance",
    ),
    pytest.param(
        403,
        {},
        j(
            {
                "error": {
                    "message": "Billing account is disabled for this project.",
                    "code": "billing_not_active",
                }
            }
        ),
        E.BILLING,
        {"code": "billing_not_active"},
        id="403-billing",
    ),
    pytest.param(
        400,
        {},
        anthropic(
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to "
            "upgrade or purchase credits.",
        ),
        E.BILLING,
        {"code": "invalid_request_error"},
        id="anthropic-400-credit-balance",
    ),
    # --- AuthFailed: 401 generic, 403 generic ------------------------------------------------------------
    pytest.param(
        401,
        {},
        openrouter(401, "No auth credentials found"),
        E.AUTH_FAILED,
        {"code": None},
        id="openrouter-401-generic",
    ),
    pytest.param(
        401,
        {},
        openai(
            "You didn't provide an API key. You need to provide your API key in an Authorization header.",
            "invalid_request_error",
            None,
        ),
        E.AUTH_FAILED,
        {"code": "invalid_request_error"},
        id="openai-401-missing-key",
    ),
    pytest.param(401, {}, b"Unauthorized", E.AUTH_FAILED, {}, id="bare-401"),
    pytest.param(
        403,
        {},
        anthropic("permission_error", "Your API key does not have permission to use the specified resource."),
        E.AUTH_FAILED,
        {"code": "permission_error"},
        id="anthropic-403-permission",
    ),
    pytest.param(
        403,
        {},
        openai(
            "Country, region, or territory not supported",
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
        E.AUTH_FAILED,
        {"code": "unsupported_country_region_territory"},
        id="openai-403-region",
    ),
    pytest.param(403, {}, b"<html><body>Forbidden</body></html>", E.AUTH_FAILED, {}, id="bare-403-html"),
    # --- Revoked: 401 with token_revoked / invalid_api_key / token_invalidated --------------------------
    pytest.param(
        401,
        {},
        openai(f"Incorrect API key provided: {FAKE_KEY}.", "invalid_request_error", "invalid_api_key"),
        E.REVOKED,
        {"code": "invalid_api_key"},
        id="openai-invalid-api-key",
    ),
    pytest.param(
        401,
        {},
        openai(
            "Your authentication token has been invalidated. Please try signing in again.",
            "invalid_request_error",
            "token_invalidated",
        ),
        E.REVOKED,
        {"code": "token_invalidated"},
        id="token-invalidated",
    ),
    pytest.param(
        401,
        {},
        j({"error": {"message": "This API key has been revoked.", "code": "token_revoked"}}),
        E.REVOKED,
        {"code": "token_revoked"},
        id="token-revoked",
    ),
    pytest.param(
        401,
        {},
        anthropic("authentication_error", "invalid x-api-key"),
        E.REVOKED,
        {"code": "authentication_error"},
        id="anthropic-invalid-x-api-key",
    ),
    pytest.param(
        400,
        {},
        google(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        ),
        E.REVOKED,
        {"code": "INVALID_ARGUMENT"},
        id="google-400-api-key-invalid",
    ),
    # --- Overloaded: 503, 529, 429 with overloaded/capacity wording ---------------------------------------
    pytest.param(
        529,
        {},
        anthropic("overloaded_error", "Overloaded"),
        E.OVERLOADED,
        {"code": "overloaded_error"},
        id="anthropic-529",
    ),
    pytest.param(503, {}, b"Service Unavailable", E.OVERLOADED, {}, id="bare-503"),
    pytest.param(
        503,
        {},
        google(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        E.OVERLOADED,
        {"code": "UNAVAILABLE"},
        id="google-503",
    ),
    pytest.param(
        429,
        {},
        j(
            {
                "error": {
                    "message": "The engine is currently overloaded, please try again later",
                    "type": "server_error",
                }
            }
        ),
        E.OVERLOADED,
        {},
        id="429-overloaded-wording",
    ),
    pytest.param(
        429,
        {},
        b"We're experiencing high demand and are at capacity right now.",
        E.OVERLOADED,
        {},
        id="429-capacity-wording",
    ),
    pytest.param(
        500, {}, anthropic("overloaded_error", "Overloaded"), E.OVERLOADED, {}, id="500-with-overloaded-code"
    ),
    # --- UpstreamRateLimited: aggregator says the upstream model is rate limited ---------------------------
    pytest.param(
        429,
        {},
        openrouter(
            429,
            "Provider returned error",
            raw="google/gemini-2.0-flash-exp:free is temporarily rate-limited upstream. Please retry shortly, "
            "or add your own key to accumulate your rate limits: https://openrouter.ai/settings/integrations",
            provider_name="Google AI Studio",
        ),
        E.UPSTREAM_RATE_LIMITED,
        {"code": None},
        id="openrouter-provider-returned-error",
    ),
    pytest.param(
        429,
        {},
        openrouter(
            429,
            "meta-llama/llama-3.3-70b-instruct:free is temporarily rate-limited upstream. Please retry shortly.",
        ),
        E.UPSTREAM_RATE_LIMITED,
        {},
        id="openrouter-upstream-wording",
    ),
    pytest.param(
        429,
        {},
        openrouter(
            429,
            "Provider returned error",
            raw='{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).",'
            '"status":"RESOURCE_EXHAUSTED"}}',
            provider_name="Google",
        ),
        E.UPSTREAM_RATE_LIMITED,
        {},
        id="openrouter-upstream-json-raw",
    ),
    pytest.param(
        429,
        {},
        openrouter(429, "Provider returned error", raw="Overloaded", provider_name="Anthropic"),
        E.OVERLOADED,
        {},
        id="openrouter-upstream-overloaded",
    ),
    # Messages that merely contain the word "upstream" are not an aggregator speaking: the key that was
    # sent is the one limited, so it is benched (RateLimited), not left alone by a fallback.
    pytest.param(
        429,
        {},
        openai("Upstream request limit exceeded for this API key.", "requests", "rate_limit_exceeded"),
        E.RATE_LIMITED,
        {"code": "rate_limit_exceeded"},
        id="provider-says-upstream-with-code",
    ),
    pytest.param(
        429,
        {"Retry-After": "2"},
        b"Too many requests: upstream rate limit reached, retry later",
        E.RATE_LIMITED,
        {},
        id="gateway-plain-text-upstream",
    ),
    pytest.param(
        429,
        {},
        j({"message": "API rate limit exceeded", "upstream": "api.example.com"}),
        E.RATE_LIMITED,
        {},
        id="gateway-json-upstream-field",
    ),
    pytest.param(
        429,
        {},
        j({"error": {"message": "rate limited by upstream, slow down", "type": "error"}}),
        E.RATE_LIMITED,
        {},
        id="gateway-rate-limited-by-upstream",
    ),
    pytest.param(
        429,
        {},
        b"<html><head><title>429 Too Many Requests (upstream)</title></head></html>",
        E.RATE_LIMITED,
        {},
        id="proxy-html-upstream",
    ),
    pytest.param(
        429,
        {},
        openrouter(429, "Provider returned error", raw="slow down", provider_name="Together"),
        E.UPSTREAM_RATE_LIMITED,
        {},
        id="openrouter-provider-name-without-the-word",
    ),
    # --- ServerError: 500, 502, 504, other 5xx -----------------------------------------------------------
    pytest.param(
        500,
        {},
        openai(
            "The server had an error while processing your request. Sorry about that!", "server_error", None
        ),
        E.SERVER_ERROR,
        {"code": "server_error"},
        id="openai-500",
    ),
    pytest.param(
        500, {}, anthropic("api_error", "Internal server error"), E.SERVER_ERROR, {}, id="anthropic-500"
    ),
    pytest.param(500, {}, b"", E.SERVER_ERROR, {}, id="bare-500"),
    pytest.param(
        502,
        {},
        b"<!DOCTYPE html><html><head><title>example.com | 502: Bad gateway</title></head>"
        b"<body><h1>Bad gateway</h1><p>Cloudflare</p></body></html>",
        E.SERVER_ERROR,
        {"message": "example.com | 502: Bad gateway"},
        id="cloudflare-502",
    ),
    pytest.param(504, {}, b"upstream request timeout", E.SERVER_ERROR, {}, id="504"),
    pytest.param(599, {}, b"", E.SERVER_ERROR, {}, id="other-5xx"),
    pytest.param(
        302, {"location": "https://example.com/"}, b"", E.SERVER_ERROR, {}, id="unexpected-redirect"
    ),
    # --- ModelNotFound: 404 naming the model -------------------------------------------------------------
    pytest.param(
        404,
        {},
        openai(
            "The model `gpt-9` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        E.MODEL_NOT_FOUND,
        {"code": "model_not_found"},
        id="openai-model-not-found",
    ),
    pytest.param(
        404,
        {},
        anthropic("not_found_error", "model: claude-9-opus"),
        E.MODEL_NOT_FOUND,
        {},
        id="anthropic-404-model",
    ),
    pytest.param(
        404,
        {},
        j({"error": {"message": "The model `llama-9` does not exist.", "type": "invalid_request_error"}}),
        E.MODEL_NOT_FOUND,
        {},
        id="404-model-wording-no-code",
    ),
    pytest.param(
        400,
        {},
        openai("The model `gpt-9` does not exist", "invalid_request_error", "model_not_found"),
        E.MODEL_NOT_FOUND,
        {},
        id="400-model-not-found-code",
    ),
    # --- ClientError: 400 (context length, content filter, bad params), 413, bare 404 ---------------------
    pytest.param(404, {}, b"", E.CLIENT_ERROR, {"context_length": False}, id="bare-404-empty"),
    pytest.param(404, {}, b"404 page not found", E.CLIENT_ERROR, {}, id="bare-404-text"),
    pytest.param(
        404,
        {},
        b"<html><head><title>404 Not Found</title></head><body><center>nginx</center></body></html>",
        E.CLIENT_ERROR,
        {},
        id="bare-404-html",
    ),
    pytest.param(
        400,
        {},
        openai(
            "This model's maximum context length is 128000 tokens. However, your messages resulted in "
            "130512 tokens. Please reduce the length of the messages.",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        E.CLIENT_ERROR,
        {"context_length": True, "code": "context_length_exceeded"},
        id="openai-context-length",
    ),
    pytest.param(
        400,
        {},
        anthropic("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
        E.CLIENT_ERROR,
        {"context_length": True},
        id="anthropic-prompt-too-long",
    ),
    pytest.param(
        400,
        {},
        j({"error": {"message": "Input validation error: too many tokens in the request", "code": 400}}),
        E.CLIENT_ERROR,
        {"context_length": True},
        id="too-many-tokens",
    ),
    pytest.param(
        413,
        {},
        anthropic("request_too_large", "Request exceeds the maximum allowed number of bytes."),
        E.CLIENT_ERROR,
        {"context_length": True},
        id="anthropic-413",
    ),
    pytest.param(
        413, {}, b"Request Entity Too Large", E.CLIENT_ERROR, {"context_length": True}, id="bare-413"
    ),
    pytest.param(
        400,
        {},
        openai(
            "Your request was rejected as a result of our safety system.",
            "invalid_request_error",
            "content_policy_violation",
        ),
        E.CLIENT_ERROR,
        {"context_length": False, "code": "content_policy_violation"},
        id="content-filter",
    ),
    pytest.param(
        400,
        {},
        openai("Invalid value for 'temperature': must be <= 2.", "invalid_request_error", "invalid_value"),
        E.CLIENT_ERROR,
        {"context_length": False},
        id="bad-param",
    ),
    pytest.param(
        422,
        {},
        j(
            {
                "detail": [
                    {"loc": ["body", "messages"], "msg": "field required", "type": "value_error.missing"}
                ]
            }
        ),
        E.CLIENT_ERROR,
        {"context_length": False},
        id="422",
    ),
    pytest.param(
        422,
        {},
        j({"detail": "Input is too long for requested model."}),
        E.CLIENT_ERROR,
        {"context_length": True, "message": "Input is too long for requested model."},
        id="422-context",
    ),
    pytest.param(409, {}, b"conflict", E.CLIENT_ERROR, {}, id="other-4xx"),
]


@pytest.mark.parametrize(("status", "headers", "body", "expected", "attrs"), CASES)
def test_table(
    status: int, headers: dict[str, str], body: bytes, expected: ErrorClass, attrs: dict[str, Any]
) -> None:
    got = classify(status, headers, body, NOW)
    assert got.error_class is expected, got
    assert got.status == status
    assert len(got.message) <= MESSAGE_LIMIT
    for name, value in attrs.items():
        actual = getattr(got, name)
        if isinstance(value, float):
            assert actual == pytest.approx(value), name
        else:
            assert actual == value, name
    if expected is not E.CLIENT_ERROR:
        assert not got.context_length


def test_table_covers_every_class_an_answer_can_have() -> None:
    covered = {p.values[3] for p in CASES}
    # ConnectionError and Timeout happen when there is no answer to classify; the sidecar sets them.
    assert covered == set(ErrorClass) - {E.CONNECTION_ERROR, E.TIMEOUT}


def test_reset_from_headers_wins_over_body() -> None:
    body = j({"error": {"type": "usage_limit_reached", "resets_in_seconds": 7200}})
    got = classify(429, {"retry-after": "600"}, body, NOW)
    assert got.reset_at == pytest.approx(NOW + 600)


def test_body_reset_used_when_headers_have_none() -> None:
    body = j({"error": {"message": "slow down", "retry_after": 9}})
    got = classify(429, {"retry-after": "garbage"}, body, NOW)
    assert got.reset_at == pytest.approx(NOW + 9)


def test_message_is_short_and_flat() -> None:
    long = "Something went wrong.\n\n" + "very " * 500 + "long"
    got = classify(500, {}, openai(long, "server_error", None), NOW)
    assert len(got.message) <= MESSAGE_LIMIT
    assert got.message.startswith("Something went wrong. very very")
    assert "\n" not in got.message


def test_upstream_message_names_the_provider() -> None:
    body = openrouter(429, "Provider returned error", raw="rate-limited upstream", provider_name="Together")
    assert classify(429, {}, body, NOW).message == "Provider returned error; Together: rate-limited upstream"


# --- never raises on garbage ------------------------------------------------------------------------------

GARBAGE_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json at all", id="text"),
    pytest.param(b'{"error": {"message": "truncated', id="truncated-json"),
    pytest.param(b'{"error": {"code": "rate_limit_exceeded", "message": "x"}', id="truncated-json-2"),
    pytest.param(bytes(range(256)) * 4, id="binary"),
    pytest.param(b"\xff\xfe\xfd invalid utf-8 \xc3\x28", id="bad-utf8"),
    pytest.param(b"x" * 1_000_000, id="1mb-text"),
    pytest.param(j({"error": {"message": "y" * 1_000_000}}), id="1mb-json"),
    pytest.param(b"[" * 100_000, id="deep-nesting"),
    pytest.param(b'{"a":' * 50_000, id="deep-object"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"12345", id="json-number"),
    pytest.param(b'"rate limited"', id="json-string"),
    pytest.param(b"[]", id="json-empty-list"),
    pytest.param(b"[1, 2]", id="json-list-of-numbers"),
    pytest.param(j({"error": None}), id="error-null"),
    pytest.param(j({"error": ["a", "b"]}), id="error-list"),
    pytest.param(
        j({"error": {"message": 5, "code": ["x"], "type": {"a": 1}, "status": None, "metadata": [1]}}),
        id="wrong-types",
    ),
    pytest.param(
        j({"error": {"code": 10**400, "metadata": {"raw": {"nested": [1, 2]}, "provider_name": 7}}}),
        id="huge-int",
    ),
    pytest.param(j({"error": {"code": True, "details": [None, {"reason": 5}]}}), id="bool-code"),
    pytest.param(b"<html>" + b"<div>" * 10_000 + b"</html>", id="html-soup"),
]


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 429, 500, 503, 529, 0, 999])
@pytest.mark.parametrize("body", GARBAGE_BODIES)
def test_garbage_never_raises(status: int, body: bytes) -> None:
    headers = {
        "retry-after": "\x00garbage",
        "x-ratelimit-reset": "nan",
        "x-ratelimit-reset-tokens": "forever",
    }
    got = classify(status, headers, body, NOW)
    assert isinstance(got, Classification)
    assert got.error_class in set(ErrorClass)
    assert got.reset_at is None
    assert len(got.message) <= MESSAGE_LIMIT


def test_truncated_rate_limit_json_still_classified_by_status() -> None:
    got = classify(429, {}, b'{"error": {"code": "rate_limit_exceeded", "message": "x"', NOW)
    assert got.error_class is E.RATE_LIMITED


# --- key redaction ----------------------------------------------------------------------------------------

REDACTION_BODIES = [
    pytest.param(
        401,
        openai(
            f"Incorrect API key provided: {FAKE_KEY}. You can find your API key at ...",
            "x",
            "invalid_api_key",
        ),
        id="openai-echo",
    ),
    pytest.param(401, f"invalid key {FAKE_KEY}".encode(), id="plain-text"),
    pytest.param(
        401, f"<html><head><title>Bad key {FAKE_KEY}</title></head></html>".encode(), id="html-title"
    ),
    pytest.param(
        429,
        openrouter(
            429, "Provider returned error", raw=f"key {FAKE_KEY} is rate-limited upstream", provider_name="X"
        ),
        id="openrouter-raw",
    ),
    pytest.param(401, j({"error": f"Authorization: Bearer {FAKE_KEY}"}), id="bearer"),
    pytest.param(400, j({"detail": f"bad request for key={FAKE_KEY}"}), id="fastapi-detail"),
    pytest.param(500, j({"error": {"message": "x " * 90 + FAKE_KEY + " trailing"}}), id="straddles-the-cut"),
]


@pytest.mark.parametrize(("status", "body"), REDACTION_BODIES)
def test_fake_key_never_in_message(status: int, body: bytes) -> None:
    got = classify(status, {}, body, NOW)
    assert FAKE_KEY not in got.message
    assert "SECRETKEY" not in got.message
    assert "1234567890abcdef" not in got.message


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        pytest.param("sk-abc***xyz", "Incorrect API key provided: sk-abc***xyz.", id="openai-masked"),
        pytest.param(
            "sk-proj-********************************************abcd",
            "Incorrect API key provided: sk-proj-********************************************abcd.",
            id="openai-proj-masked",
        ),
        pytest.param("sk-ant-api03-AbC123dEf456", "invalid key sk-ant-api03-AbC123dEf456", id="anthropic"),
        pytest.param("sk-or-v1-0123456789abcdef", "bad sk-or-v1-0123456789abcdef", id="openrouter"),
        pytest.param(
            "AIzaSyD-1234567890abcdefghijklmnopqrstu",
            "API key AIzaSyD-1234567890abcdefghijklmnopqrstu",
            id="google",
        ),
        pytest.param(
            "0123456789abcdef0123456789abcdef.AbCdEfGhIjKlMnOp",
            "令牌 0123456789abcdef0123456789abcdef.AbCdEfGhIjKlMnOp 无效",
            id="zai-style",
        ),
    ],
)
def test_key_shapes_redacted(secret: str, message: str) -> None:
    got = classify(401, {}, j({"error": {"message": message}}), NOW)
    assert secret not in got.message
    assert "[redacted]" in got.message


@pytest.mark.parametrize(
    "message",
    [
        "The task-runner model claude-3-5-sonnet-20241022 is unavailable",
        "Rate limit exceeded: free-models-per-day-for-accounts-without-credits",
        "https://platform.openai.com/docs/guides/error-codes/api-errors",
    ],
)
def test_ordinary_words_not_redacted(message: str) -> None:
    assert classify(500, {}, j({"error": {"message": message}}), NOW).message == message


# --- in-band stream errors -------------------------------------------------------------------------------

STREAM_ERRORS = [
    pytest.param(
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n',
        E.OVERLOADED,
        529,
        {"code": "overloaded_error", "message": "Overloaded"},
        id="anthropic-overloaded",
    ),
    pytest.param(
        b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}\n\n',
        E.SERVER_ERROR,
        500,
        {},
        id="anthropic-api-error",
    ),
    pytest.param(
        b'event: error\r\ndata: {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}\r\n\r\n',
        E.RATE_LIMITED,
        429,
        {},
        id="anthropic-rate-limit-crlf",
    ),
    pytest.param(
        b'data: {"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}}\n\n',
        E.RATE_LIMITED,
        429,
        {"code": "rate_limit_exceeded"},
        id="openai-style-data-error",
    ),
    pytest.param(
        b": OPENROUTER PROCESSING\n\n"
        b'data: {"id": "gen-1", "object": "chat.completion.chunk", "error": {"code": 502, "message": '
        b'"Upstream error from Together"}, "choices": [{"delta": {}, "finish_reason": "error"}]}\n\n',
        E.SERVER_ERROR,
        502,
        {},
        id="openrouter-after-comment",
    ),
    pytest.param(
        b'data: {"error": {"code": 429, "message": "Provider returned error", "metadata": '
        b'{"raw": "rate-limited upstream", "provider_name": "DeepInfra"}}}\n\n',
        E.UPSTREAM_RATE_LIMITED,
        429,
        {},
        id="openrouter-upstream-in-band",
    ),
    pytest.param(
        b'data: {"error": {"code": "rate_limit_exceeded", "message": "upstream rate limit reached"}}\n\n',
        E.RATE_LIMITED,
        429,
        {},
        id="in-band-upstream-word-is-the-providers-own-limit",
    ),
    pytest.param(
        b'event: error\ndata: {"type": "error", "code": "server_error", "message": "The server had an error"}\n\n',
        E.SERVER_ERROR,
        500,
        {"code": "server_error"},
        id="responses-api-error",
    ),
    pytest.param(
        b'event: response.failed\ndata: {"type": "response.failed", "response": {"status": "failed", '
        b'"error": {"code": "rate_limit_exceeded", "message": "Rate limit reached"}}}\n\n',
        E.RATE_LIMITED,
        429,
        {"code": "rate_limit_exceeded"},
        id="responses-api-failed",
    ),
    pytest.param(
        b'event: error\ndata: {"type": "error", "error": {"type": "invalid_request_error", '
        b'"message": "prompt is too long: 210000 tokens > 200000 maximum"}}\n\n',
        E.CLIENT_ERROR,
        400,
        {"context_length": True},
        id="in-band-context-length",
    ),
    pytest.param(
        b'data: {"error": {"type": "usage_limit_reached", "message": "The usage limit has been reached", '
        b'"resets_in_seconds": 5400}}\n\n',
        E.USAGE_LIMIT,
        429,
        {"reset_at": NOW + 5400},
        id="in-band-usage-limit",
    ),
    pytest.param(
        b'event: error\ndata: {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}\n\n',
        E.REVOKED,
        401,
        {},
        id="in-band-revoked",
    ),
    pytest.param(
        b'data: {"error": {"type": "not_found_error", "message": "model: claude-9"}}\n\n',
        E.MODEL_NOT_FOUND,
        404,
        {},
        id="in-band-model-not-found",
    ),
    pytest.param(
        b'data: {"error": {"message": "Server is overloaded, try later"}}\n\n',
        E.OVERLOADED,
        529,
        {},
        id="in-band-overloaded-wording",
    ),
    pytest.param(
        b'data: {"error": {"message": "Something odd", "type": "weird_error"}}\n\n',
        E.SERVER_ERROR,
        500,
        {},
        id="in-band-unknown-defaults-to-server-error",
    ),
    pytest.param(
        b"event: error\ndata: upstream exploded\n\n", E.SERVER_ERROR, 500, {}, id="in-band-not-json"
    ),
    pytest.param(
        b'data: {"error": "too many requests"}\n\n', E.RATE_LIMITED, 429, {}, id="in-band-string-error"
    ),
    # The word "error" only as JSON escapes: classified like the plain spelling (the event is decoded
    # whenever "error" or a \u escape is in it).
    pytest.param(
        b'data: {"\\u0065rror": "too many requests"}\n\n', E.RATE_LIMITED, 429, {}, id="in-band-escaped-key"
    ),
    pytest.param(
        b'data: {"type": "\\u0065\\u0072\\u0072\\u006f\\u0072", "message": "Overloaded"}\n\n',
        E.OVERLOADED,
        529,
        {},
        id="in-band-escaped-type",
    ),
]


@pytest.mark.parametrize(("event", "expected", "status", "attrs"), STREAM_ERRORS)
def test_stream_error_events(event: bytes, expected: ErrorClass, status: int, attrs: dict[str, Any]) -> None:
    got = classify_stream_event(event, NOW)
    assert got is not None
    assert got.error_class is expected
    assert got.status == status
    for name, value in attrs.items():
        actual = getattr(got, name)
        assert actual == (pytest.approx(value) if isinstance(value, float) else value), name


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            b'data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": '
            b'[{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}\n\n',
            id="openai-chunk",
        ),
        pytest.param(
            b'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1", "role": "assistant"}}\n\n',
            id="anthropic-message-start",
        ),
        pytest.param(b'event: ping\ndata: {"type": "ping"}\n\n', id="anthropic-ping"),
        pytest.param(
            b'event: response.created\ndata: {"type": "response.created", "response": {"status": "in_progress"}}\n\n',
            id="responses-created",
        ),
        pytest.param(b"data: [DONE]\n\n", id="done"),
        pytest.param(b"", id="empty"),
        pytest.param(b": OPENROUTER PROCESSING\n\n", id="comment-only"),
        pytest.param(b'data: {"error": null, "choices": []}\n\n', id="error-null"),
        pytest.param(b'data: {"error": {}, "choices": []}\n\n', id="error-empty"),
        pytest.param(bytes(range(256)) * 10, id="binary"),
        pytest.param(b"data: " + b"x" * 1_000_000 + b"\n\n", id="1mb"),
        pytest.param(b"data: " + b"[" * 100_000 + b"\n\n", id="deep-nesting"),
        pytest.param(
            b'data: {"choices": [{"delta": {"content": "an error occurred in my code"}}]}\n\n',
            id="word-error",
        ),
    ],
)
def test_normal_stream_events_are_not_errors(event: bytes) -> None:
    assert classify_stream_event(event, NOW) is None


def test_stream_event_message_redacted() -> None:
    event = (
        b'event: error\ndata: {"type": "error", "error": {"type": "authentication_error", "message": "bad key '
        + FAKE_KEY.encode()
        + b'"}}\n\n'
    )
    got = classify_stream_event(event, NOW)
    assert got is not None
    assert FAKE_KEY not in got.message
