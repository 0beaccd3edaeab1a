"""Answers from an OpenAI-compatible server (vLLM, `transformers serve`, llama.cpp, a hosted API).

The client is plain `urllib`: one POST to `<url>/chat/completions` per prompt, with
`batch_size` requests in flight. Some servers (`transformers serve`) ignore `n`; missing
samples are asked for again, with a different seed, until every prompt has its share.
`Answer` is what every generator returns, this one and `seqkd.generate_local` alike.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from still.errors import StillError
from still.secrets import REDACTED, redact
from still.yaml_errors import quoted


@dataclass
class Answer:
    text: str
    truncated: bool  # stopped at max_new_tokens, not at an end-of-turn token


class EndpointClient:
    """POST <url>/chat/completions; HTTP and network failures become one-line StillErrors."""

    def __init__(self, spec):
        self.spec = spec
        self.url = f"{spec.url}/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        self._key: str | None = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise StillError(
                    f"endpoint {spec.url}: environment variable {spec.api_key_env} is not set",
                    hint=f"export {spec.api_key_env}=<your API key>",
                )
            self._key = key
            self.headers["Authorization"] = f"Bearer {key}"

    def _shown(self, text: str, limit: int) -> str:
        """What a server sent, as a message may show it: never the key (a server may echo the
        request's headers), whatever its shape; non-ASCII as itself."""
        if self._key:
            text = text.replace(self._key, REDACTED)
        return redact(text)[:limit]

    def complete(
        self,
        messages: list[dict],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int,
    ) -> list[Answer]:
        payload = {
            "model": self.spec.model,
            "messages": messages,
            "n": n,
            "seed": seed,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
        }
        body = self._post(payload)
        try:
            choices = json.loads(body)["choices"]
            return [
                Answer(
                    (choice["message"].get("content") or "").strip(),
                    truncated=choice.get("finish_reason") == "length",
                )
                for choice in choices
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StillError(
                f"{self.url}: not an OpenAI chat completion response: "
                f"{quoted(self._shown(body.decode(errors='replace'), 120))}",
                hint="check generate.endpoint.url",
            ) from None

    def _post(self, payload: dict) -> bytes:
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = self._shown(
                error.read().decode(errors="replace").strip().replace("\n", " "), 200
            )
            hints = {
                401: f"check the API key in ${self.spec.api_key_env or 'api_key_env'}",
                404: "the url should end where /chat/completions starts (often /v1)",
            }
            raise StillError(
                f"{self.url}: HTTP {error.code} {error.reason}: {detail}",
                hint=hints.get(error.code, "check generate.endpoint"),
            ) from None
        except urllib.error.URLError as error:
            raise StillError(
                f"cannot reach {self.url}: {error.reason}",
                hint="is the server running? check generate.endpoint.url",
            ) from None
        except TimeoutError:
            raise StillError(
                f"{self.url}: no response within {self.spec.timeout_s:g} s",
                hint="raise generate.endpoint.timeout_s",
            ) from None


def generate_endpoint(
    spec,
    conversations: list[list[dict]],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[list[Answer]]:
    client = EndpointClient(spec)
    failed = threading.Event()

    def answer(index: int) -> list[Answer]:
        got: list[Answer] = []
        while len(got) < samples and not failed.is_set():
            more = client.complete(
                conversations[index],
                n=samples - len(got),
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + index * samples + len(got),
            )
            if not more:
                raise StillError(f"{client.url}: the server returned no choices")
            got += more
        return got[:samples]

    with ThreadPoolExecutor(max_workers=batch_size) as pool:
        futures = [pool.submit(answer, index) for index in range(len(conversations))]
        try:
            return [future.result() for future in futures]
        except BaseException:
            failed.set()  # the other requests stop after their current call
            for future in futures:
                future.cancel()
            raise
