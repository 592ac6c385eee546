"""predict's lean route answers every bad request as FastAPI's route did, word for word.

The expected answers were read from FastAPI's own predict route before the lean one stood in
front of it: status, error code, each problem's location and the message.
"""

from __future__ import annotations

import httpx
import pytest

JSON = {"content-type": "application/json"}
DOUBLE = "/v1/functions/double/predict"
NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"
NOT_A_NUMBER = "Input should be a valid number, unable to parse string as a number"
NOT_AN_INTEGER = "Input should be a valid integer, unable to parse string as an integer"

CASES = {
    "empty body": (DOUBLE, b"", JSON, 422, [(["body"], "Field required")]),
    "malformed JSON": (DOUBLE, b'{"input": ', JSON, 400, "malformed JSON body: Expecting value"),
    "not UTF-8": (DOUBLE, b'{"input": "\xff"}', JSON, 400, "There was an error parsing the body"),
    "an array": (DOUBLE, b"[1]", JSON, 422, [(["body"], NOT_AN_OBJECT)]),
    "a string": (DOUBLE, b'"x"', JSON, 422, [(["body"], NOT_AN_OBJECT)]),
    "null": (DOUBLE, b"null", JSON, 422, [(["body"], NOT_AN_OBJECT)]),
    "no input": (DOUBLE, b"{}", JSON, 422, [(["body", "input"], "Field required")]),
    "an unknown field": (
        DOUBLE,
        b'{"input": 1, "extra": true}',
        JSON,
        422,
        [(["body", "extra"], "Extra inputs are not permitted")],
    ),
    "a wrong type": (DOUBLE, b'{"input": "x"}', JSON, 422, [(["body", "input"], NOT_AN_INTEGER)]),
    "an unknown priority": (
        DOUBLE,
        b'{"input": 1, "priority": "urgent"}',
        JSON,
        422,
        [(["body", "priority"], "Input should be 'high', 'normal' or 'low'")],
    ),
    "a nested model": (
        "/v1/functions/norm/predict",
        b'{"input": {"x": "far"}}',
        JSON,
        422,
        [(["body", "input", "x"], NOT_A_NUMBER), (["body", "input", "y"], "Field required")],
    ),
    "a negative timeout": (
        DOUBLE + "?timeout=-1",
        b'{"input": 1}',
        JSON,
        422,
        [(["query", "timeout"], "Input should be greater than 0")],
    ),
    "a timeout that is no number": (
        DOUBLE + "?timeout=abc",
        b'{"input": 1}',
        JSON,
        422,
        [(["query", "timeout"], NOT_A_NUMBER)],
    ),
    "a timeout over max_timeout_s": (
        DOUBLE + "?timeout=100000",
        b'{"input": 1}',
        JSON,
        422,
        "timeout=100000.0 is above max_timeout_s (30.0); ask for at most 30.0 s",
    ),
    "an unknown on_timeout": (
        DOUBLE + "?timeout=1&on_timeout=never",
        b'{"input": 1}',
        JSON,
        422,
        [(["query", "on_timeout"], "Input should be 'error' or 'poll'")],
    ),
    "a bad query and a bad body, together": (
        DOUBLE + "?timeout=abc",
        b'{"input": "x"}',
        JSON,
        422,
        [(["query", "timeout"], NOT_A_NUMBER), (["body", "input"], NOT_AN_INTEGER)],
    ),
    "an empty Idempotency-Key": (
        DOUBLE,
        b'{"input": 1}',
        {**JSON, "Idempotency-Key": ""},
        422,
        [(["header", "Idempotency-Key"], "String should have at least 1 character")],
    ),
    "an Idempotency-Key over 255 characters": (
        DOUBLE,
        b'{"input": 1}',
        {**JSON, "Idempotency-Key": "k" * 256},
        422,
        [(["header", "Idempotency-Key"], "String should have at most 255 characters")],
    ),
    "a form content type": (
        DOUBLE,
        b'{"input": 1}',
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "the body must be JSON sent with content-type: application/json, "
        "not application/x-www-form-urlencoded",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_answers_a_bad_request_as_fastapi_did(client: httpx.Client, case: str) -> None:
    path, body, headers, status, expected = CASES[case]
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if isinstance(expected, str):
        assert error["message"] == expected
        return
    assert error["code"] == "validation_error"
    assert [(p["loc"], p["message"]) for p in error["problems"]] == expected
    assert error["message"] == "; ".join(f"{'.'.join(loc)}: {msg}" for loc, msg in expected)


def test_predict_answers_get_with_405(client: httpx.Client) -> None:
    response = client.get(DOUBLE)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
