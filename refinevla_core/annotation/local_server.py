"""A small chat-completions server on 127.0.0.1 that misbehaves on request: the stand-in for the teacher API.

The benchmark and the tests need a server that speaks the same HTTP API as Gemini/OpenAI/vLLM/Ollama but runs here,
offline, with a chosen latency and chosen faults (429 with Retry-After, 500, slow answers, a body that is not JSON,
replies with broken JSON or a missing section, refusing JSON mode, rejecting the key). It is honest about being a
stand-in: its rationales are templated from the request (instruction line and a digest of the images), not written
by a model. Every request is recorded (body, image digests, fault served) so tests can count calls per frame.

    with ChatServer(latency_s=0.2) as server:
        ... base_url = server.base_url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

FAULTS = ("ok", "400", "429", "500", "503", "slow", "malformed_body", "bad_json", "missing_section", "empty", "headed",
          "reject_json_mode", "401", "404", "drop")


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    image_digests: tuple[str, ...]  # sha256[:16] of each image data URL of the first user turn
    fault: str
    time: float = field(default_factory=time.monotonic)

    @property
    def is_reask(self) -> bool:
        return len(self.body.get("messages", [])) > 2


def request_image_digests(body: dict[str, Any]) -> tuple[str, ...]:
    digests = []
    for message in body.get("messages", [])[:2]:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url", {}).get("url", "")
                    digests.append(hashlib.sha256(url.encode()).hexdigest()[:16])
    return tuple(digests)


def image_digest(data_url: str) -> str:
    """The digest the server records for one image data URL (see prompts.png_data_url)."""
    return hashlib.sha256(data_url.encode()).hexdigest()[:16]


def _user_text(body: dict[str, Any]) -> str:
    for message in body.get("messages", []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def templated_rationale(body: dict[str, Any]) -> dict[str, str]:
    """The stand-in's answer: four non-empty sections derived from the request."""
    text = _user_text(body)
    match = re.search(r"Instruction:\s*(.+)", text)
    instruction = match.group(1).strip() if match else text[:80]
    images = request_image_digests(body)
    return {
        "observation": f"The scene for '{instruction}' seen in {len(images)} image(s) ({', '.join(images) or 'none'}).",
        "situation_analysis": "The robot is partway through the task.",
        "spatial_reasoning": "The gripper is above and behind the object it needs.",
        "task_planning": "Move toward the object, then follow the demonstrated motion and gripper commands.",
    }


UNAUTHORISED = {"error": {"message": "Incorrect API key provided"}}


class _QuietServer(ThreadingHTTPServer):
    """The listening socket; `chat` is the ChatServer whose behaviour its handlers serve."""

    daemon_threads = True
    chat: ChatServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections are a fault we serve on purpose, not news


class _ChatHandler(BaseHTTPRequestHandler):
    """One connection: routes GET /v1/models, GET /v1/stats and POST /v1/chat/completions to the server's ChatServer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
    server: _QuietServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        chat = self.server.chat
        if self.path.rstrip("/").endswith("/stats"):  # for a server in another process (the benchmark)
            self.send_json(200, chat.stats())
            return
        if not self.path.rstrip("/").endswith("/models"):
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        chat.count_model_list_call()
        if not chat.authorised(self.headers.get("Authorization")):
            self.send_json(401, UNAUTHORISED)
            return
        self.send_json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self) -> None:
        chat = self.server.chat
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.send_json(400, {"error": {"message": "request body is not JSON"}})
            return
        fault = chat.record(self.path, body)
        if not chat.authorised(self.headers.get("Authorization")) or fault == "401":
            self.send_json(401, UNAUTHORISED)
            return
        with chat.answering():
            if chat.latency_s:
                time.sleep(chat.latency_s)
            chat.answer(self, body, fault, len(raw))

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> None:
        """`payload` as JSON (or `raw` bytes as they are) with its length, so the keep-alive connection stays usable."""
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class ChatServer:
    """Threaded HTTP server answering POST /v1/chat/completions and GET /v1/models on 127.0.0.1.

    Faults: `plan` (a list consumed one per request, in arrival order) and/or `fault_for(body) -> fault | None`
    (per request, e.g. keyed on the image digest); plain "ok" when neither says otherwise.
    """

    def __init__(self, latency_s: float = 0.0, *, api_key: str | None = None, plan: list[str] | None = None,
                 fault_for: Callable[[dict[str, Any]], str | None] | None = None, slow_s: float = 2.0,
                 retry_after: str | None = "0", usage: bool = True, json_mode_supported: bool = True) -> None:
        self.latency_s = latency_s
        self.api_key = api_key
        self.plan: deque[str] = deque(plan or [])
        self.fault_for = fault_for
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.usage = usage
        self.json_mode_supported = json_mode_supported
        self.requests: list[RecordedRequest] = []
        self.model_list_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0  # the most chat requests being answered at once
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _ChatHandler)
        self._httpd.chat = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chat-server", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- behaviour ----------------------------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"calls": len(self.requests), "max_in_flight": self.max_in_flight}

    def count_model_list_call(self) -> None:
        with self._lock:
            self.model_list_calls += 1

    def authorised(self, header: str | None) -> bool:
        return self.api_key is None or header == f"Bearer {self.api_key}"

    def record(self, path: str, body: dict[str, Any]) -> str:
        """Record a chat request and return the fault to serve it."""
        fault = self._next_fault(body)
        with self._lock:
            self.requests.append(RecordedRequest(path, body, request_image_digests(body), fault))
        return fault

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Counts the chat requests being answered at once (max_in_flight)."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _next_fault(self, body: dict[str, Any]) -> str:
        with self._lock:
            if self.plan:
                return self.plan.popleft()
        fault = self.fault_for(body) if self.fault_for else None
        return fault or "ok"

    def answer(self, handler: _ChatHandler, body: dict[str, Any], fault: str, request_bytes: int) -> None:
        """Reply to one chat request as `fault` says: an error status, a broken body, a dropped connection, or a
        completion (templated sections, whole or damaged)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        if self._send_failure(handler, body, fault):
            return
        if fault == "slow":
            time.sleep(self.slow_s)
        content = _completion_content(templated_rationale(body), fault)
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        if self.usage:
            prompt_tokens = request_bytes // 4  # a stand-in count: servers report real tokenizer counts
            payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                                "total_tokens": prompt_tokens + len(content) // 4}
        handler.send_json(200, payload)

    def _send_failure(self, handler: _ChatHandler, body: dict[str, Any], fault: str) -> bool:
        """Answer with an error status, a broken body or a dropped connection if `fault` (or an unsupported JSON
        mode) asks for one; False when the request gets a completion."""
        if "response_format" in body and (fault == "reject_json_mode" or not self.json_mode_supported):
            handler.send_json(400, {"error": {"message": "response_format is not supported by this model"}})
        elif fault in ("400", "429", "500", "503"):
            headers = {"Retry-After": self.retry_after} if fault == "429" and self.retry_after is not None else {}
            handler.send_json(int(fault), {"error": {"message": f"stand-in fault {fault}"}}, headers)
        elif fault == "404":
            handler.send_json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        elif fault == "malformed_body":
            handler.send_json(200, None, raw=b'{"choices": [{"message": {"content": "trunc')
        elif fault == "drop":
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(2)
        else:
            return False
        return True


def _completion_content(sections: dict[str, str], fault: str) -> str:
    """The assistant message for a completion: the sections as JSON, or damaged as `fault` says."""
    if fault == "bad_json":
        full = json.dumps(sections)
        return full[: len(full) // 2]  # cut mid-object: neither valid JSON nor headed text
    if fault == "missing_section":
        return json.dumps({k: v for k, v in sections.items() if k != "task_planning"})
    if fault == "empty":
        return ""
    if fault == "headed":
        return "\n".join(f"## {k.replace('_', ' ').title()}\n{v}" for k, v in sections.items())
    return json.dumps(sections)


def serve(argv: list[str] | None = None) -> None:
    """`python -m refinevla_core.annotation.local_server --latency-ms 200`: print the port, serve until killed."""
    parser = argparse.ArgumentParser(description="stand-in chat-completions server on 127.0.0.1")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    server = ChatServer(latency_s=args.latency_ms / 1000.0).start()
    print(server.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


class ChatServerProcess:
    """The stand-in server in its own process, so its request handling does not share the client's CPU and GIL
    (a real teacher API runs elsewhere): what a benchmark of the client should measure against."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self._process: Any = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.base_url}/stats", timeout=10).json()

    def __enter__(self) -> ChatServerProcess:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "refinevla_core.annotation.local_server", "--latency-ms",
             str(self.latency_s * 1000.0)], stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline().strip()
        if not line.isdigit():
            self._process.kill()
            raise RuntimeError(f"the stand-in chat server did not start (printed {line!r})")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.kill()
        self._process.wait(timeout=30)


if __name__ == "__main__":
    serve()
