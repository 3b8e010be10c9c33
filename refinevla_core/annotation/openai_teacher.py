"""The OpenAI-compatible chat-completions teacher: Gemini, OpenAI, vLLM and Ollama behind one HTTP client.

All four speak POST {base_url}/chat/completions with image_url parts holding base64 data URLs, so one client serves
them; the differences are handled here: JSON mode (response_format json_object) is requested and dropped for the
rest of the run if a server answers 400 to it; usage tokens are summed when reported; 429/5xx/timeouts/dropped
connections are retried with backoff (honouring Retry-After); an invalid reply is re-asked with the parse error, then
recorded as a failed frame. Errors that would fail every frame (server down, key rejected, model unknown) raise
TeacherError.

Base URLs: Gemini https://generativelanguage.googleapis.com/v1beta/openai, OpenAI https://api.openai.com/v1,
vLLM http://127.0.0.1:8000/v1, Ollama http://127.0.0.1:11434/v1.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from refinevla_core.annotation import prompts
from refinevla_core.annotation.config import AnnotationConfig
from refinevla_core.annotation.teacher import FrameRequest, Teacher, TeacherError, TeacherReply
from refinevla_core.annotation.throttle import RateLimiter, backoff_delay, parse_retry_after
from refinevla_core.rationale import RationaleError, parse_rationale

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
MAX_RETRY_AFTER_S = 300.0
SERVER_HINT = ("start the server (vLLM: `vllm serve MODEL --port 8000`; Ollama: `ollama serve`) or fix --base-url "
               "(Gemini: https://generativelanguage.googleapis.com/v1beta/openai, OpenAI: https://api.openai.com/v1)")


MODEL_REQUIRED = ("--model is required for --teacher openai (e.g. gemini-2.0-flash, gpt-4o-mini, or the name your "
                  "vLLM/Ollama server serves)")


def resolve_api_key(env_name: str) -> str | None:
    """The API key from the named environment variable; '' names none (local servers). Raises TeacherError."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise TeacherError(
            f"the API key environment variable {env_name} is not set; `export {env_name}=...` with your key, "
            "name another variable with --api-key-env, or pass --api-key-env '' for a local server without a key"
        )
    return key


def _server_message(response: httpx.Response) -> str:
    """The server's own error text, short: OpenAI-style {"error": {"message": ...}} or the raw body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(data, list) and data:  # Gemini sometimes wraps the error in a list
        data = data[0]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(data)[:300]


def reply_text(data: Any) -> str:
    """choices[0].message.content as text (string or list of text parts). Raises RationaleError if absent."""
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise RationaleError("the server's reply has no choices[0].message") from None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        reason = message.get("refusal") if isinstance(message, dict) else None
        raise RationaleError(f"the reply is empty{f' (refusal: {reason})' if reason else ''}")
    return content


class OpenAICompatTeacher(Teacher):
    """Chat-completions client with bounded concurrency (set by the runner), rate limit, retries and re-asks."""

    kind = "openai"
    needs_images = True
    needs_state = False

    def __init__(self, config: AnnotationConfig, api_key: str | None = None, *,
                 client: httpx.Client | None = None, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not config.model:
            raise TeacherError(MODEL_REQUIRED)
        base = config.base_url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise TeacherError(f"--base-url {config.base_url!r} must start with http:// or https:// "
                               "(e.g. http://127.0.0.1:8000/v1 for vLLM)")
        self.config = config
        self.base_url = base
        self.concurrency = config.concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency),
        )
        self._sleep = sleep  # injectable: tests record the backoff delays instead of waiting them out
        self._limiter = RateLimiter(config.requests_per_minute, sleep=sleep)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._json_mode = config.json_mode != "off"
        self.transport_retries = 0  # attempts that were retried (429/5xx/timeouts), for the summary
        self.http_requests = 0  # every POST sent, answered or not: what the server saw
        self.retry_reasons: Counter[str] = Counter()  # "HTTP 429" / "HTTP 500" / "timeout" ... -> retried attempts
        self.json_mode_dropped = False

    @property
    def name(self) -> str:
        return f"openai:{self.config.model}"

    @property
    def prompt_hash(self) -> str:
        p = self.config.prompt
        return prompts.prompt_hash(system=p.system, user=p.user, reask=p.reask,
                                   future_actions=self.config.future_actions,
                                   image_offsets=list(self.config.image_offsets))

    def close(self) -> None:
        self._client.close()

    # ---- preflight ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """GET {base_url}/models: fails fast when the server is down or rejects the key (before anything is stored)."""
        url = f"{self.base_url}/models"
        try:
            response = self._client.get(url, headers=self._headers, timeout=min(30.0, self.config.timeout_s))
        except httpx.TimeoutException:
            raise TeacherError(f"{self.base_url} did not answer within {min(30.0, self.config.timeout_s):.0f} s; "
                               f"check the server is up, or {SERVER_HINT}") from None
        except httpx.TransportError as e:
            raise TeacherError(f"cannot reach {self.base_url} ({e.__class__.__name__}: {e}); {SERVER_HINT}") from None
        if response.status_code in (401, 403):
            raise self._auth_error(response)
        # other statuses: some servers don't list models; the first chat request reports real problems

    def _auth_error(self, response: httpx.Response) -> TeacherError:
        return TeacherError(
            f"{self.base_url} rejected the API key (HTTP {response.status_code}: {_server_message(response)}); "
            f"check the key in ${self.config.api_key_env or '(none)'} or name the right variable with --api-key-env"
        )

    # ---- one frame ----------------------------------------------------------------------------------------------
    def messages(self, request: FrameRequest) -> list[dict[str, Any]]:
        """The chat: system prompt, then one user turn with the image(s) first and the rendered text."""
        p = self.config.prompt
        user_text = prompts.render(p.user, request.prompt_values().as_fields())
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": prompts.png_data_url(image)}} for image in request.images
        ]
        parts.append({"type": "text", "text": user_text})
        return [{"role": "system", "content": p.system.strip()}, {"role": "user", "content": parts}]

    def annotate(self, request: FrameRequest) -> TeacherReply:
        messages = self.messages(request)
        reply = TeacherReply(rationale=None)
        last_error = ""
        for _ in range(1 + self.config.max_reasks):
            data = self._post(messages)
            reply.calls += 1
            usage = data.get("usage") if isinstance(data, dict) else None
            if isinstance(usage, dict):
                reply.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                reply.completion_tokens += int(usage.get("completion_tokens") or 0)
            text = ""
            try:
                text = reply_text(data)
                reply.reply = text
                reply.rationale = parse_rationale(text)
                reply.error = ""
                return reply
            except RationaleError as e:
                last_error = str(e)
                finish = _finish_reason(data)
                if finish == "length":
                    last_error += f" (the reply was cut off at max_tokens={self.config.max_tokens})"
            messages = [*messages, {"role": "assistant", "content": text or "(empty)"},
                        {"role": "user", "content": prompts.render(self.config.prompt.reask, {"error": last_error})}]
        reply.error = f"invalid reply after {reply.calls} attempt(s): {last_error}"
        return reply

    def _body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "messages": messages,
                                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        if self._json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _post(self, messages: list[dict[str, Any]]) -> Any:
        """One chat completion, retried on transient failures. Returns the decoded JSON body."""
        url = f"{self.base_url}/chat/completions"
        last = ""
        attempt = 0
        while attempt <= self.config.max_retries:
            result = self._post_once(url, messages)
            if result.ok:
                return result.data
            if result.again:
                continue  # the same attempt again, without JSON mode (not a failure of the server)
            last = result.failure
            if attempt == self.config.max_retries:
                break
            self._back_off(attempt, result)
            attempt += 1
        raise TeacherError(
            f"{url} failed {self.config.max_retries + 1} times in a row (last: {last}); the server is down or "
            "overloaded: lower --concurrency / set --requests-per-minute, check the server, and rerun - done frames "
            "are kept and will not be requested again"
        )

    def _post_once(self, url: str, messages: list[dict[str, Any]]) -> _Attempt:
        """One POST: the decoded body, a transient failure worth a retry, or `again` when the server refused JSON
        mode; an answer no retry can change raises TeacherError."""
        json_mode = self._json_mode
        self._limiter.wait()
        with self._lock:
            self.http_requests += 1
        try:
            response = self._client.post(url, json=self._body(messages), headers=self._headers)
        except httpx.TimeoutException:
            return _Attempt(failure=f"no answer within {self.config.timeout_s:.0f} s (timeout_s)", reason="timeout")
        except httpx.TransportError as e:
            return _Attempt(failure=f"{e.__class__.__name__}: {e}")
        status = response.status_code
        if status == 200:
            try:
                return _Attempt(ok=True, data=response.json())
            except ValueError:
                return _Attempt(failure=f"HTTP 200 with a body that is not JSON: {response.text[:120]!r}",
                                reason="HTTP 200 not JSON")
        if status in RETRY_STATUSES:
            return _Attempt(failure=f"HTTP {status}: {_server_message(response)}", reason=f"HTTP {status}",
                            retry_after=parse_retry_after(response.headers.get("retry-after")))
        if status == 400 and json_mode and self.config.json_mode == "auto":
            # servers that lack JSON mode answer 400 in their own words ("response_format is not
            # supported", Gemini's "Unknown name ..."): try once without it; a 400 then is a real error
            with self._lock:
                self._json_mode = False
                self.json_mode_dropped = True
            return _Attempt(again=True)
        raise self._request_error(url, response)

    def _request_error(self, url: str, response: httpx.Response) -> TeacherError:
        """The error for an answer that retrying cannot fix, naming the setting to change."""
        status = response.status_code
        if status in (401, 403):
            return self._auth_error(response)
        if status == 404:
            return TeacherError(f"{url} answered 404 ({_server_message(response)}); check --model "
                                f"{self.config.model!r} is served there and --base-url ends where "
                                "/chat/completions begins (e.g. .../v1)")
        return TeacherError(f"{url} answered HTTP {status}: {_server_message(response)}; fix the request "
                            "settings (model, max_tokens, image size) and rerun - done frames are kept")

    def _back_off(self, attempt: int, result: _Attempt) -> None:
        """Count the retry by reason, then wait: the server's Retry-After (capped), else jittered exponential."""
        with self._lock:
            self.transport_retries += 1
            self.retry_reasons[result.reason] += 1
            delay = backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
        if result.retry_after is not None:
            delay = min(result.retry_after, MAX_RETRY_AFTER_S)
        self._sleep(delay)


@dataclass(frozen=True)
class _Attempt:
    """What one POST gave: the decoded body (`ok`), a transient failure (message, retry reason, the server's
    Retry-After), or `again`: the server refused JSON mode, so the same attempt is sent without it."""

    ok: bool = False
    data: Any = None
    failure: str = ""
    reason: str = "connection error"
    retry_after: float | None = None
    again: bool = False


def _finish_reason(data: Any) -> str | None:
    try:
        return data["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
