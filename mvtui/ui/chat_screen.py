"""The chat screen (c): talk to the selected server's model through mvtui's own router and
watch the answer stream in, token by token: the quickest smoke test after a start or a wake.

The questions go to the router (`core.router_url`, with a `[router] api_keys` key when it
has one) with the openai client, as any client's would, so the router picks the server
among those with the model. A stopped instance is started, and a sleeping server woken,
before the first question, through the dashboard's own commands, with their progress on the
status line. The conversation is kept per model for as long as the dashboard runs:
`/clear` forgets it, `/system TEXT` sets the system prompt. Esc stops an answer that is
streaming (the router cancels it upstream); Esc again closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static
from textual.worker import Worker

from mvtui.cluster.state import Server
from mvtui.errors import MvtuiError
from mvtui.models.chat import Conversation
from mvtui.ui.actions import CoreActions
from mvtui.ui.panels import Palette

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

PAINT_EVERY_S = 0.05  # an answer is repainted at most this often while it streams
HELP = "/clear forgets the conversation · /system TEXT sets the system prompt (/system alone shows it)"


@dataclass(frozen=True)
class ChatContext:
    """What the screen uses of the dashboard."""

    server: Server
    model: str  # the name the router routes by
    router_url: str
    api_key: str
    actions: CoreActions
    conversation: Conversation  # the dashboard's, kept between openings
    palette: Callable[[], Palette]


@dataclass
class Answer:
    """An answer as it streams."""

    text: str = ""
    tokens: int | None = None  # from the last chunk's usage
    started: float = 0.0
    stopped: bool = False

    def stats(self) -> str:
        seconds = time.monotonic() - self.started
        if self.tokens is None:
            return f"{seconds:.1f} s" + (" · stopped" if self.stopped else "")
        rate = self.tokens / seconds if seconds > 0 else 0.0
        return f"{self.tokens} tokens · {seconds:.1f} s · {rate:.0f} tokens/s"


class ChatScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "stop_or_close", "stop / close")]

    def __init__(self, context: ChatContext) -> None:
        super().__init__()
        self.context = context
        self.answering: Worker[None] | None = None
        self.preparing: asyncio.Task[bool] | None = None
        self.answer: Answer | None = None
        self._client: AsyncOpenAI | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="chat-box", classes="dialog"):
            yield Static(id="chat-status")
            yield VerticalScroll(id="chat-log")
            yield Input(placeholder="ask something; Enter sends (/clear, /system TEXT)", id="chat-input")

    def on_mount(self) -> None:
        box = self.query_one("#chat-box")
        box.border_title = f"chat: {self.context.model}"
        box.border_subtitle = "Enter sends · Esc stops an answer, Esc again closes · /clear · /system TEXT"
        for turn in self.context.conversation.turns:
            self.add_message(turn["role"], turn["content"])
        self.query_one("#chat-input", Input).focus()
        self.show_status()
        self.set_interval(0.5, self.show_status, name="chat status")
        if self.context.actions.preparation(self.context.server) is not None:
            self.run_worker(self.ready(), group="prepare")  # at once: the start or wake is the point

    async def on_unmount(self) -> None:
        if self.preparing is not None:
            self.preparing.cancel()  # only our wait: the start or wake itself goes on
        if self._client is not None:
            await self._client.close()

    # --- the transcript and the status line --------------------------------------------------

    def add_message(self, role: str, text: str) -> Static:
        """A message at the end of the transcript: "user", "assistant", "note" or "error"."""
        widget = Static(self.message_text(role, text), classes=f"chat-message -{role}")
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(widget)
        log.scroll_end(animate=False)
        return widget

    def message_text(self, role: str, text: str) -> Text:
        palette = self.context.palette()
        if role == "user":
            return Text.assemble(("you  ", f"bold {palette.accent}"), (text, palette.text))
        if role == "assistant":
            return Text.assemble((f"{self.context.model}  ", f"bold {palette.starting}"), (text.lstrip(), palette.text))
        if role == "error":
            return Text(text, style=f"bold {palette.down}")
        return Text(text, style=palette.muted)

    def note(self, text: str, *, error: bool = False) -> None:
        if self.is_attached:
            self.add_message("error" if error else "note", text)

    def show_status(self) -> None:
        if self.is_attached:
            self.query_one("#chat-status", Static).update(self.status_text())

    def status_text(self) -> Text:
        server, palette = self.context.server, self.context.palette()
        if self.preparing is not None and not self.preparing.done():
            instance = self.context.actions.instance(server)
            progress = instance.progress if instance is not None and instance.progress else ""
            return Text(f"{server.name}: {server.state}" + (f" · {progress}" if progress else ""), style=f"bold {palette.starting}")
        if self.answer is not None and not self._done():
            return Text(f"answering… {self.answer.stats()}", style=palette.starting)
        questions = len(self.context.conversation.turns) // 2
        where = f"{self.context.model} through the router at {self.context.router_url} · {server.name} {server.state}"
        return Text(f"{where} · {questions} question{'s' if questions != 1 else ''} so far", style=palette.muted)

    def _done(self) -> bool:
        return self.answering is None or self.answering.is_finished

    # --- input -------------------------------------------------------------------------------

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        event.input.value = ""
        if not text:
            return
        if text.startswith("/"):
            self.command(text)
        elif not self._done():
            self.note("an answer is still streaming: Esc stops it")
        else:
            self.answering = self.run_worker(self.ask(text), group="answer")

    def command(self, text: str) -> None:
        name, _, rest = text.partition(" ")
        conversation = self.context.conversation
        if name == "/clear":
            conversation.clear()
            self.query_one("#chat-log", VerticalScroll).remove_children()
            self.note("conversation cleared" + ("; the system prompt stays" if conversation.system else ""))
        elif name == "/system" and rest.strip():
            conversation.system = rest.strip()
            self.note("system prompt set")
        elif name == "/system":
            self.note(f"system prompt: {conversation.system}" if conversation.system else "no system prompt")
        else:
            self.note(f"unknown command {name}: {HELP}")
        self.show_status()

    def action_stop_or_close(self) -> None:
        if not self._done():
            assert self.answering is not None
            self.answering.cancel()
        else:
            self.dismiss(None)

    # --- a question and its answer ---------------------------------------------------------------

    async def ready(self) -> bool:
        """Start or wake the server first when it needs it (one at a time, shared)."""
        if self.preparing is None or self.preparing.done():
            need = self.context.actions.preparation(self.context.server)
            if need is None:
                return True
            self.preparing = asyncio.ensure_future(self._prepare(need))
            self.show_status()
        return await asyncio.shield(self.preparing)

    async def _prepare(self, need: str) -> bool:
        server, actions = self.context.server, self.context.actions
        self.note(f"{server.name} is {server.state}: {'starting' if need == 'start' else 'waking'} it first")
        try:
            said = await (actions.start(server) if need == "start" else actions.wake(server))
        except MvtuiError as error:
            self.note(f"could not {need} {server.name}: {error}", error=True)
            return False
        self.note(said)
        return True

    async def ask(self, question: str) -> None:
        from openai import APIError

        self.add_message("user", question)
        if not await self.ready():
            return
        answer = self.answer = Answer(started=time.monotonic())
        view = self.add_message("assistant", "")
        try:
            await self.stream(question, answer, view)
        except asyncio.CancelledError:
            answer.stopped = True
        except APIError as error:  # the router cannot be reached, or said no
            self.failed(view, answer, api_problem(error, self.context.router_url))
            return
        except Exception as error:  # whatever else: said here, never the dashboard's end
            log.exception("the chat with %s failed", self.context.model)
            self.failed(view, answer, f"{type(error).__name__}: {error}")
            return
        view.update(self.message_text("assistant", answer.text))
        self.context.conversation.add(question, answer.text)
        self.note(("stopped · " if answer.stopped else "") + answer.stats())
        self.show_status()

    def failed(self, view: Static, answer: Answer, problem: str) -> None:
        """An answer that failed: what came of it stays on screen (not in the conversation)."""
        if answer.text:
            view.update(self.message_text("assistant", answer.text))
        else:
            view.remove()
        self.note(problem, error=True)

    async def stream(self, question: str, answer: Answer, view: Static) -> None:
        """Read the answer's chunks as they come, painting the text so far."""
        request: dict[str, Any] = {
            "model": self.context.model,
            "messages": self.context.conversation.messages(question),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        stream = await self.client().chat.completions.create(**request)
        painted = 0.0
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    answer.tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.text += chunk.choices[0].delta.content
                    if time.monotonic() - painted >= PAINT_EVERY_S:
                        painted = time.monotonic()
                        self.paint(view, answer)
        finally:
            await stream.close()  # stopped midway: the router cancels the generation upstream

    def paint(self, view: Static, answer: Answer) -> None:
        view.update(self.message_text("assistant", answer.text))
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def client(self) -> AsyncOpenAI:
        if self._client is None:
            from openai import AsyncOpenAI  # loaded when the first question is asked

            base = self.context.router_url.rstrip("/") + "/v1"
            self._client = AsyncOpenAI(base_url=base, api_key=self.context.api_key, max_retries=0)
        return self._client


def api_problem(error: Exception, router_url: str) -> str:
    """What went wrong with a question, for the transcript."""
    from openai import APIConnectionError, APIStatusError

    if isinstance(error, APIConnectionError):
        return f"cannot reach the router at {router_url}: {error.__cause__ or error}"
    if isinstance(error, APIStatusError):
        return f"the router answered {error.status_code}: {_message(error.body) or error.message}"
    return f"{type(error).__name__}: {error}"


def _message(body: Any) -> str:
    inner = body.get("error", body) if isinstance(body, dict) else None
    return str(inner.get("message") or "") if isinstance(inner, dict) else ""
