"""The translation from requests and Jupyter messages to E2B's wire format (no kernels)."""

import datetime as dt

import pytest

from protocol import (
    BadRequest,
    message_event,
    normalize_language,
    parse_execute_request,
    result_event,
)


def test_execute_request_defaults_and_validation():
    req = parse_execute_request(b'{"code": "1+1"}')
    assert req == {
        "code": "1+1",
        "context_id": None,
        "language": "python",
        "env_vars": {},
        "timeout": None,
    }
    req = parse_execute_request(b'{"code": "x", "context_id": "abc", "env_vars": {"A": "1"}}')
    assert req["context_id"] == "abc" and req["language"] is None
    assert req["env_vars"] == {"A": "1"}
    assert parse_execute_request(b'{"code": "x", "timeout": 2}')["timeout"] == 2.0
    assert parse_execute_request(b'{"code": "x", "language": "Python3"}')["language"] == "python"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1]",
        b"{not json",
        b'{"code": 1}',
        b'{"code": "x", "context_id": "a", "language": "python"}',
        b'{"code": "x", "language": "cobol"}',
        b'{"code": "x", "env_vars": {"A=B": "1"}}',
        b'{"code": "x", "env_vars": {"A": 1}}',
        b'{"code": "x", "env_vars": ["A"]}',
        b'{"code": "x", "timeout": -1}',
        b'{"code": "x", "timeout": true}',
        b'{"code": "x", "context_id": 5}',
        b"\xff\xfe",
    ],
)
def test_bad_execute_requests_are_400(body):
    with pytest.raises(BadRequest):
        parse_execute_request(body)


def test_languages():
    assert normalize_language(None) == "python"
    assert normalize_language("py") == "python"
    for bad in ("javascript", "r", 3, ["python"]):
        with pytest.raises(BadRequest):
            normalize_language(bad)


def test_result_maps_mime_types_like_e2b():
    event = result_event(
        {
            "text/plain": "'hello'",
            "text/html": "<b>hi</b>",
            "image/png": "iVBOR",
            "application/json": {"a": 1},
            "e2b/chart": {"type": "line"},
            "application/vnd.custom": "x",
        },
        True,
    )
    assert event == {
        "type": "result",
        "text": "hello",
        "html": "<b>hi</b>",
        "png": "iVBOR",
        "json": {"a": 1},
        "chart": {"type": "line"},
        "extra": {"application/vnd.custom": "x"},
        "is_main_result": True,
    }
    # Only single quotes around the whole text are stripped, and absent types are omitted.
    assert result_event({"text/plain": '"x"'}, False) == {
        "type": "result",
        "text": '"x"',
        "is_main_result": False,
    }
    assert result_event({"text/plain": "'"}, False)["text"] == "'"


def test_iopub_messages_become_stream_lines():
    date = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    out = message_event(
        {"msg_type": "stream", "header": {"date": date}, "content": {"name": "stdout", "text": "a\n"}}
    )
    assert out == {"type": "stdout", "text": "a\n", "timestamp": date.isoformat()}
    err = message_event(
        {"msg_type": "error", "content": {"ename": "E", "evalue": "v", "traceback": ["l1", "l2"]}}
    )
    assert err == {"type": "error", "name": "E", "value": "v", "traceback": "l1\nl2"}
    count = message_event({"msg_type": "execute_input", "content": {"execution_count": 3}})
    assert count == {"type": "number_of_executions", "execution_count": 3}
    display = message_event({"msg_type": "display_data", "content": {"data": {"text/plain": "x"}}})
    assert display["is_main_result"] is False
    main = message_event({"msg_type": "execute_result", "content": {"data": {"text/plain": "2"}}})
    assert main["is_main_result"] is True and main["text"] == "2"
    for ignored in ("status", "clear_output", "comm_open", None):
        assert message_event({"msg_type": ignored, "content": {}}) is None
    # Hostile or broken content never raises.
    assert message_event({"msg_type": "stream", "content": {"name": "other"}}) is None
    assert message_event({"msg_type": "execute_input", "content": {"execution_count": "x"}}) is None
    assert message_event({}) is None
