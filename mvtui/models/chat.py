"""`mvtui run`: a streaming chat in the terminal, through any OpenAI-compatible router.

The history is kept and sent with each question. `/system TEXT` sets the system prompt,
`/clear` forgets the history (the system prompt stays), `/exit` (or Ctrl-D) leaves. Ctrl-C
while an answer streams stops that answer (what came so far stays in the history) and
returns to the prompt; Ctrl-C at the prompt only says how to leave.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from openai import OpenAI

PROMPT = ">>> "
HELP = """/system TEXT  set the system prompt (/system alone shows it)
/clear        forget the conversation (the system prompt stays)
/exit         leave (Ctrl-D too); Ctrl-C stops an answer that is streaming"""
EXITS = ("/exit", "/bye", "/quit")


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": question}]

    def add(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def clear(self) -> None:
        self.turns.clear()


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool = False  # by Ctrl-C
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0


class Chat:
    def __init__(self, client: OpenAI, model: str, out: TextIO, *, max_tokens: int | None = None, verbose: bool = False) -> None:
        self.client = client
        self.model = model
        self.out = out
        self.max_tokens = max_tokens
        self.verbose = verbose
        self.conversation = Conversation()

    def loop(self, read: Callable[[str], str] = input) -> int:
        """Until /exit or end of input; 0."""
        while True:
            try:
                line = read(PROMPT)
            except EOFError:
                self._say("")
                return 0
            except KeyboardInterrupt:
                self._say("\n(/exit or Ctrl-D leaves)")
                continue
            if not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """One line of input; False when it asks to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.ask(text)
        return True

    def command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        if name in EXITS:
            return False
        if name == "/system":
            self._system(rest.strip())
        elif name == "/clear":
            self.conversation.clear()
            self._say("(conversation cleared" + ("; the system prompt stays)" if self.conversation.system else ")"))
        elif name in ("/help", "/?"):
            self._say(HELP)
        else:
            self._say(f"(unknown command {name}; /help lists them)")
        return True

    def _system(self, prompt: str) -> None:
        if not prompt:
            self._say(f"(system prompt: {self.conversation.system!r})" if self.conversation.system else "(no system prompt)")
            return
        self.conversation.system = prompt
        self._say("(system prompt set)")

    def ask(self, question: str) -> Answer | None:
        """Stream the answer to `question`; it and the answer join the history. None (and
        nothing kept) when the server answered with an error."""
        from openai import APIConnectionError, APIError

        try:
            answer = self._stream(question)
        except APIConnectionError as error:
            self._say(f"\n(cannot reach {self.client.base_url}: {error.__cause__ or error})")
            return None
        except APIError as error:
            self._say(f"\n(error: {_api_message(error)})")
            return None
        self.conversation.add(question, answer.text)
        self._say("\n(stopped)" if answer.stopped else "")
        if self.verbose:
            self._say(_stats(answer))
        return answer

    def _stream(self, question: str) -> Answer:
        started = time.monotonic()
        pieces: list[str] = []
        usage: Any = None
        stream = None
        try:
            stream = self.client.chat.completions.create(**self._request(question))
            for chunk in stream:
                usage = chunk.usage or usage
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    self.out.write(pieces[-1])
                    self.out.flush()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # the router cancels the generation upstream
            return Answer("".join(pieces), stopped=True, seconds=time.monotonic() - started)
        return Answer(
            "".join(pieces),
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            seconds=time.monotonic() - started,
        )

    def _request(self, question: str) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": self.conversation.messages(question),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.max_tokens is not None:
            request["max_tokens"] = self.max_tokens
        return request

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _stats(answer: Answer) -> str:
    if answer.completion_tokens is None:
        return f"({answer.seconds:.1f} s)"
    rate = answer.completion_tokens / answer.seconds if answer.seconds > 0 else 0.0
    return f"({answer.prompt_tokens} prompt tokens, {answer.completion_tokens} tokens, {answer.seconds:.1f} s, {rate:.1f} tokens/s)"


def _api_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(error, "message", error))
