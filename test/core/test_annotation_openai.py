"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1 that answers 429, 500, slowly, with
malformed JSON, with missing sections, or refuses JSON mode: retries, re-asks, failures and run-level errors."""

from __future__ import annotations

import random
import socket
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from refinevla_core.annotation.config import AnnotationConfig
from refinevla_core.annotation.local_server import ChatServer
from refinevla_core.annotation.openai_teacher import OpenAICompatTeacher, resolve_api_key
from refinevla_core.annotation.teacher import FrameRequest, TeacherError
from refinevla_core.annotation.throttle import RateLimiter, backoff_delay, parse_retry_after

IMAGE = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)


def request(frame: int = 0) -> FrameRequest:
    actions = np.zeros((3, 7), np.float32)
    actions[:, 0], actions[:, 6] = 0.01, 1.0
    return FrameRequest(episode=0, frame=frame, num_frames=10, instruction="put the spoon in the cup", task="",
                        future_actions=actions, images=(IMAGE,), image_offsets=(0,))


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


def teacher_for(server: ChatServer, api_key: str | None = None, **overrides) -> tuple[OpenAICompatTeacher, list]:
    """A teacher whose backoff waits are recorded instead of slept (no test waits out a real backoff)."""
    delays: list[float] = []
    settings = {"teacher": "openai", "model": "stand-in", "base_url": server.base_url, "max_retries": 3,
                "backoff_base_s": 0.5, "max_reasks": 2, "timeout_s": 5.0, **overrides}
    return OpenAICompatTeacher(AnnotationConfig(**settings), api_key=api_key, seed=0, sleep=delays.append), delays


def test_request_carries_instruction_image_actions_key_and_json_mode(server):
    server.api_key = "sk-test"
    teacher, _ = teacher_for(server, api_key="sk-test")
    teacher.check()
    reply = teacher.annotate(request())
    assert reply.ok and reply.calls == 1 and reply.error == ""
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    body = server.requests[0].body
    assert body["model"] == "stand-in" and body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system" and "JSON object" in system["content"]
    image_part, text_part = user["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Instruction: put the spoon in the cup" in text_part["text"]
    assert "t+2: 1.0 cm forward; no rotation; gripper open" in text_part["text"]


@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed_body", "drop"])
def test_transient_faults_are_retried(server, fault):
    server.plan.extend([fault, fault])
    teacher, delays = teacher_for(server)
    reply = teacher.annotate(request())
    assert reply.ok and reply.calls == 1
    assert server.calls == 3 and teacher.transport_retries == 2
    assert len(delays) == 2


def test_backoff_is_exponential_with_jitter_and_retry_after_wins(server):
    server.plan.extend(["500", "500", "500"])
    teacher, delays = teacher_for(server)
    assert teacher.annotate(request()).ok
    rng = random.Random(0)
    assert delays == [backoff_delay(a, 0.5, 60.0, rng) for a in range(3)]  # uniform(0, 0.5 * 2**attempt)
    server.plan.extend(["429"])
    server.retry_after = "7"
    delays.clear()
    assert teacher.annotate(request()).ok
    assert delays == [7.0]


def test_slow_answers_time_out_and_are_retried(server):
    server.plan.append("slow")
    server.slow_s = 1.5
    teacher, delays = teacher_for(server, timeout_s=0.3)
    reply = teacher.annotate(request())
    assert reply.ok and server.calls == 2 and len(delays) == 1


def test_invalid_reply_is_reasked_with_the_parse_error(server):
    server.plan.append("bad_json")
    teacher, _ = teacher_for(server)
    reply = teacher.annotate(request())
    assert reply.ok and reply.calls == 2
    _, second = server.requests
    assert len(second.body["messages"]) == 4
    assistant, reask = second.body["messages"][2:]
    assert assistant["role"] == "assistant" and assistant["content"].startswith('{"observation"')
    assert reask["role"] == "user" and "neither a JSON object nor the headings" in reask["content"]


def test_a_frame_that_stays_invalid_fails_with_its_reason(server):
    server.fault_for = lambda body: "missing_section"
    teacher, _ = teacher_for(server, max_reasks=2)
    reply = teacher.annotate(request())
    assert not reply.ok and reply.rationale is None
    assert reply.calls == 3 and server.calls == 3
    assert reply.error == ("invalid reply after 3 attempt(s): the reply is missing or has empty section(s): "
                           "Task Planning")
    assert '"observation"' in reply.reply  # the last raw reply is kept for inspection


def test_empty_reply_fails_after_reasks(server):
    server.fault_for = lambda body: "empty"
    teacher, _ = teacher_for(server, max_reasks=0)
    reply = teacher.annotate(request())
    assert not reply.ok and reply.error == "invalid reply after 1 attempt(s): the reply is empty"


def test_headed_text_replies_are_accepted(server):
    server.plan.append("headed")
    teacher, _ = teacher_for(server)
    reply = teacher.annotate(request())
    assert reply.ok and reply.rationale.task_planning.startswith("Move toward the object")


def test_json_mode_is_dropped_once_when_the_server_refuses_it(server):
    server.json_mode_supported = False
    teacher, delays = teacher_for(server)
    assert teacher.annotate(request()).ok and teacher.annotate(request(1)).ok
    assert ["response_format" in r.body for r in server.requests] == [True, False, False]
    assert teacher.json_mode_dropped and delays == []
    strict, _ = teacher_for(server, json_mode="on")
    with pytest.raises(TeacherError, match="response_format is not supported"):
        strict.annotate(request())
    off, _ = teacher_for(server, json_mode="off")
    assert off.annotate(request()).ok and "response_format" not in server.requests[-1].body


def test_a_bad_request_without_json_mode_stops_the_run(server):
    server.plan.extend(["400", "400"])
    teacher, _ = teacher_for(server)
    with pytest.raises(TeacherError, match=r"answered HTTP 400: stand-in fault 400; fix the request settings"):
        teacher.annotate(request())
    assert ["response_format" in r.body for r in server.requests] == [True, False]


def test_rejected_key_stops_the_run(server):
    server.api_key = "sk-right"
    teacher, _ = teacher_for(server, api_key="sk-wrong", api_key_env="MY_KEY")
    with pytest.raises(TeacherError, match=r"rejected the API key \(HTTP 401.*\$MY_KEY"):
        teacher.check()
    with pytest.raises(TeacherError, match="rejected the API key"):
        teacher.annotate(request())


def test_unknown_model_stops_the_run(server):
    server.plan.append("404")
    teacher, _ = teacher_for(server)
    with pytest.raises(TeacherError, match=r"404 \(The model `stand-in` does not exist.\); check --model"):
        teacher.annotate(request())


def test_persistent_overload_stops_the_run_after_the_retries(server):
    server.fault_for = lambda body: "503"
    teacher, delays = teacher_for(server, max_retries=2)
    with pytest.raises(TeacherError, match=r"failed 3 times in a row \(last: HTTP 503.*done frames are kept"):
        teacher.annotate(request())
    assert server.calls == 3 and len(delays) == 2


def test_server_down_is_one_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = AnnotationConfig(teacher="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(TeacherError, match=r"cannot reach http://127.0.0.1:\d+/v1 \(ConnectError.*vllm serve"):
        OpenAICompatTeacher(config).check()


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("REFINEVLA_TEST_KEY", raising=False)
    with pytest.raises(TeacherError, match=r"REFINEVLA_TEST_KEY is not set; `export REFINEVLA_TEST_KEY=\.\.\.`"):
        resolve_api_key("REFINEVLA_TEST_KEY")
    monkeypatch.setenv("REFINEVLA_TEST_KEY", " sk-1 ")
    assert resolve_api_key("REFINEVLA_TEST_KEY") == "sk-1"
    assert resolve_api_key("") is None


@pytest.mark.parametrize("settings, match", [
    ({"model": ""}, "--model is required"),
    ({"model": "m", "base_url": "127.0.0.1:8000/v1"}, "must start with http"),
])
def test_bad_settings_fail_before_any_request(settings, match):
    with pytest.raises(TeacherError, match=match):
        OpenAICompatTeacher(AnnotationConfig(teacher="openai", **settings))


def test_rate_limiter_spaces_request_starts():
    now = [100.0]
    waited: list[float] = []

    def sleep(s: float) -> None:
        waited.append(s)
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one request per 0.5 s
    for _ in range(4):
        limiter.wait()
    assert waited == [0.5, 0.5, 0.5]
    now[0] += 10  # idle: no debt carried over
    assert limiter.wait() == 0.0
    assert RateLimiter(0).wait() == 0.0


def test_retry_after_formats():
    assert parse_retry_after("2.5") == 2.5
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    http_date = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(http_date, now=now) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
