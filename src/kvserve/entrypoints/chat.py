"""`kvserve chat`: an interactive terminal chat on the model's chat template.

On a terminal the input line is prompt_toolkit's: line editing, and the history of
this session under the arrow keys. Ctrl-C during a reply stops the reply (the request
is aborted, the conversation keeps what was said), Ctrl-C at the prompt clears the
line, Ctrl-D exits. Commands (`/help` lists them) never go to the model. Piped input
(a script, the tests) is read line by line instead, with the same commands.

Each turn re-renders the whole conversation, so the engine's prefix cache finds
the earlier turns' KV blocks and only the new tokens are computed; `--verbose`
prints how many prompt tokens came from the cache.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from kvserve.engine.llm_engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

PROMPT = ">>> "
HELP = """commands:
  /help           this list
  /reset          forget the conversation (asks first); the system message stays
  /system TEXT    set the system message (/system alone shows it)
  /save FILE      write the conversation to FILE as JSON (a list of {"role", "content"} messages)
  /exit           quit (or Ctrl-D)
Ctrl-C stops a reply and keeps the conversation; at the prompt it clears the line. Up/down recall earlier lines."""
NO_TEMPLATE = ("this model's tokenizer has no chat template; give one with --chat-template, or use `kvserve generate` "
               "for plain completion")


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None, add_generation_prompt: bool = True,
    continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of `messages` rendered with `chat_template` (default: the tokenizer's), by default ready for the
    assistant's turn. The rendered text holds the template's special tokens, so none are added when encoding it."""
    text = render_chat(tokenizer, messages, chat_template, add_generation_prompt, continue_final_message, chat_template_kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], chat_template: str | None = None, add_generation_prompt: bool = True,
    continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """`messages` as the text `chat_template` (default: the tokenizer's) makes of them."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_TEMPLATE)
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **(chat_template_kwargs or {}),
        )
    except TemplateError as exc:  # the template refusing these messages (roles out of order, ...)
        raise ValueError(f"the chat template failed on these messages: {exc}") from exc


def stream_reply(
    engine: LLMEngine, request_id: str, prompt: str | list[int], params: SamplingParams, out: TextIO,
    interrupted: Callable[[], bool] = lambda: False,
) -> RequestOutput | None:
    """Run one request, writing its text to `out` as it is produced, until it finishes or `interrupted()` says
    to stop: then the request is aborted (its KV blocks freed) and the last output, unfinished, comes back
    (None if there was none yet)."""
    engine.add_request(request_id, prompt, params)
    last: RequestOutput | None = None
    while True:
        for output in engine.step():
            if output.request_id == request_id:
                out.write(output.new_text[0])
                out.flush()
                last = output
                if output.finished:
                    return output
        if interrupted():
            engine.abort_request(request_id)
            return last


class LineReader(Protocol):
    """Where the user's lines come from."""

    def read(self, prompt: str) -> str | None:
        """The next line (without its newline), or None at the end of the input (Ctrl-D)."""

    def confirm(self, question: str) -> bool:
        """Ask a yes/no question; no unless the answer starts with y."""


class StreamReader:
    """Lines from a file or pipe, the prompts written to `out`."""

    def __init__(self, inp: TextIO, out: TextIO) -> None:
        self.inp, self.out = inp, out

    def read(self, prompt: str) -> str | None:
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        return line.rstrip("\n") if line else None

    def confirm(self, question: str) -> bool:
        return (self.read(f"{question} [y/N] ") or "").strip().lower().startswith("y")


class TerminalReader:
    """prompt_toolkit's line editor, with this session's lines under the up and down arrows."""

    def __init__(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory

        self.session: Any = PromptSession(history=InMemoryHistory())
        self.questions: Any = PromptSession()  # answers to confirmations stay out of the history

    def read(self, prompt: str) -> str | None:
        while True:
            try:
                return self.session.prompt(prompt)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
                continue
            except EOFError:
                return None

    def confirm(self, question: str) -> bool:
        try:
            return self.questions.prompt(f"{question} [y/N] ").strip().lower().startswith("y")
        except (KeyboardInterrupt, EOFError):
            return False


@contextmanager
def ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """While inside, Ctrl-C (SIGINT) sets a flag, read by the function yielded, instead of raising
    KeyboardInterrupt somewhere inside an engine step. Only the main thread receives signals; elsewhere the
    flag never sets."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.set())
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def describe_sampling(params: SamplingParams) -> str:
    """The sampling settings a chat shows when it starts."""
    how = "greedy" if params.temperature == 0 else f"temperature {params.temperature:g}, top_p {params.top_p:g}, " \
        f"top_k {params.top_k}"
    return f"max tokens {params.max_tokens} per reply, {how} (--max-tokens, --temperature, --top-p, --top-k)"


class ChatSession:
    """One conversation: the messages, the commands that change them, and a reply per user turn."""

    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None, verbose: bool, reader: LineReader,
                 out: TextIO) -> None:
        self.engine, self.params, self.verbose, self.reader, self.out = engine, params, verbose, reader, out
        self.system = system
        self.messages: list[dict[str, str]] = []
        self._ids = itertools.count()

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def run(self) -> int:
        """Read turns until /exit or the end of the input."""
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise ValueError(NO_TEMPLATE)
        self.say(f"kvserve chat: /help for commands, Ctrl-C stops a reply, Ctrl-D exits.\n"
                 f"{describe_sampling(self.params)}")
        while True:
            line = self.reader.read(PROMPT)
            if line is None:
                self.out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return 0
                continue
            self.turn(text)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, text: str) -> str | None:
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            if not self.messages:
                self.say("[nothing to forget]")
            elif self.reader.confirm(f"Forget the conversation ({len(self.messages)} messages)?"):
                self.messages = []
                self.say("[new conversation]")
            else:
                self.say("[kept the conversation]")
        elif name == "/system":
            if argument:
                self.system = argument
                self.say("[system message set]")
            else:
                self.say(f"[system message: {self.system!r}]" if self.system else "[no system message]")
        elif name == "/save":
            self.save(argument)
        else:
            self.say(f"[unknown command {name}: /help lists them]")
        return None

    def save(self, path: str) -> None:
        if not path:
            self.say("[/save needs a file name: /save chat.json]")
            return
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.conversation(), f, indent=2, ensure_ascii=False)
                f.write("\n")
        except OSError as exc:
            self.say(f"[could not save: {exc}]")
            return
        self.say(f"[saved {len(self.conversation())} messages to {path}]")

    def turn(self, text: str) -> None:
        """Send `text` as the user's message and stream the reply; a failed or empty reply leaves no trace."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt_ids = chat_prompt_ids(self.engine.tokenizer, self.conversation())
            with ctrl_c_stops() as interrupted:
                final = stream_reply(self.engine, f"chat-{next(self._ids)}", prompt_ids, self.params, self.out, interrupted)
        except ValueError as exc:  # the template refusing the conversation, a prompt past the context length
            self.messages.pop()
            self.say(f"[no reply: {exc}]")
            return
        self.out.write("\n")
        if final is not None and final.error is not None:
            self.messages.pop()
            self.say(f"[no reply: {final.error}]")
            return
        reply = final.outputs[0] if final is not None else None
        if reply is None or (not final.finished and not reply.text):
            self.messages.pop()
            self.say("[stopped before the reply began]")
            return
        self.messages.append({"role": "assistant", "content": reply.text})
        if not final.finished:
            self.say("[stopped: the conversation keeps the reply so far]")
        elif reply.finish_reason == "length":
            self.say(self._cut_notice(len(prompt_ids), len(reply.token_ids)))
        if self.verbose:
            self.say(f"[prompt {len(prompt_ids)} tokens, {final.num_cached_tokens} from the prefix cache; "
                     f"{len(reply.token_ids)} generated, finish_reason={reply.finish_reason}]")

    def _cut_notice(self, prompt_len: int, generated: int) -> str:
        if self.params.max_tokens is not None and generated >= self.params.max_tokens:
            return f"[cut at the reply limit of {self.params.max_tokens} tokens: raise it with --max-tokens]"
        return (f"[cut at the context length: the conversation holds {prompt_len + generated} tokens of "
                f"{self.engine.max_seq_len}; /reset starts a new one]")


def run_chat_session(engine: LLMEngine, params: SamplingParams, system: str | None, verbose: bool, reader: LineReader,
                     out: TextIO) -> int:
    """Chat until /exit or the end of the input; returns the exit status."""
    return ChatSession(engine, params, system, verbose, reader, out).run()
