"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, assistant replies out.

A stream sends, per choice, a chunk with `delta.role` first, then `delta.content`
chunks, then a chunk carrying `finish_reason`; then an optional usage chunk and
`data: [DONE]`, as OpenAI does.

Tools (`tools`, `tool_choice`, `parallel_tool_calls`) go to the chat template
(transformers' `apply_chat_template(tools=...)`); a template that renders no
tools is a 400. With the server's `--tool-call-parser`, calls in the output
become `message.tool_calls` (streamed as `delta.tool_calls`, one chunk per call
when its block closes) and finish_reason "tool_calls"; `required` and a named
function are forced by a grammar, so the call always parses; `auto` needs
`--enable-auto-tool-choice`, as in vLLM. Assistant messages with `tool_calls`
and `role: "tool"` messages (`tool_call_id`) go back through the template.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kvserve.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.entrypoints.openai.serving_engine import (
    Choices,
    OpenAIError,
    OpenAIServing,
    PromptRequest,
    ServerLimits,
    SSEResponse,
    TokenLogprobs,
    bad_request,
    check_outputs,
    engine_error,
    run_until_disconnect,
    sse,
)
from kvserve.entrypoints.openai.tool_parsers import TOOL_PARSERS, HermesToolParser, ParsedCall, ToolCallStream
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import StructuredOutputsParams
from kvserve.validation import brief

_PROBE_TOOL = {"type": "function", "function": {"name": "kvserve_probe_tool", "parameters": {"type": "object"}}}


@dataclass
class ToolPlan:
    """How one request uses tools: what the template gets, which parser reads the output (None: the output
    is content), and the grammar that forces a call (`required`, a named function)."""

    tools: list[dict[str, Any]] | None = None
    parser: type[HermesToolParser] | None = None
    constraint: StructuredOutputsParams | None = None


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], limits: ServerLimits | None = None,
                 response_role: str = "assistant", tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False) -> None:
        """`response_role`: the role of replies (vLLM's --response-role); `tool_call_parser`: the syntax of the
        model's tool calls (`--tool-call-parser`, a name in TOOL_PARSERS); `enable_auto_tool_choice`: let the
        model decide whether to call (`tool_choice` "auto")."""
        super().__init__(engine, served_model_names, limits)
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got {tool_call_parser!r}")
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the syntax of the model's tool calls)")
        self.response_role = response_role
        self.tool_parser = TOOL_PARSERS[tool_call_parser] if tool_call_parser is not None else None
        self.enable_auto_tool_choice = enable_auto_tool_choice

    def role(self, request: ChatCompletionRequest) -> str:
        """The role of the reply, as vLLM names it: --response-role for a new turn, else (continuing the final
        message, add_generation_prompt false) the role of the last message."""
        if request.add_generation_prompt or not request.messages:
            return self.response_role
        return request.messages[-1].role

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response | ChatCompletionResponse:
        self.check_model(request.model)
        self.check_common(request)
        self.check_fan_out(1, request.n)
        self._check_unsupported(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        template, template_kwargs = self.template_options(request)
        plan = self._tool_plan(request)
        constraint, constraint_param = self.requested_constraint(request)
        if plan.constraint is not None:
            if constraint is not None:
                raise bad_request(f'{constraint_param} cannot be combined with tool_choice "required" or a named function '
                                  "(the tool call's grammar constrains the output)", constraint_param)
            constraint, constraint_param = plan.constraint, "tools"
        prompt_ids = await self.preprocess(
            lambda: self.render(request.messages, request.add_generation_prompt, request.continue_final_message, template,
                                template_kwargs, plan.tools),
            "messages",
        )
        await self.compile_constraint(constraint, constraint_param)
        if request.max_completion_tokens is not None:
            max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = request.max_tokens, "max_tokens"
        max_tokens = self.max_tokens_for(len(prompt_ids), max_tokens, max_tokens is not None, param)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        renamed = {"max_tokens": param, "logprobs": "top_logprobs", "best_of": "n"}
        params = self.sampling_params(request, max_tokens, logprobs, None, renamed, constraint)
        handle = await self.submit("chatcmpl", [PromptRequest(0, prompt_ids, params)], "messages", renamed)
        if request.stream:
            return SSEResponse(self._stream(request, handle, len(prompt_ids), plan.parser), handle.abort,
                               self.limits.stream_stall_timeout_s)
        try:
            finals = await run_until_disconnect(raw_request, handle.final_outputs())
        finally:
            handle.abort()
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        check_outputs(finals)
        return self._response(request, handle, finals, len(prompt_ids), plan.parser)

    def _tool_plan(self, request: ChatCompletionRequest) -> ToolPlan:
        """What `tools` and `tool_choice` ask for, checked against this server's parser (400s naming the field)."""
        choice = request.tool_choice
        if not request.tools:
            if choice not in (None, "none"):
                raise bad_request("tool_choice needs tools: there is no function to call", "tool_choice")
            return ToolPlan()
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
        choice = "auto" if choice is None else choice
        if choice == "none":  # the template still sees the tools (as in vLLM); the output is content
            return ToolPlan(tools)
        if self.tool_parser is None:
            raise bad_request("tool calls need a server started with --tool-call-parser (the syntax of the model's calls: "
                              f"{', '.join(TOOL_PARSERS)}); send tool_choice \"none\" to only show the tools to the model",
                              "tools" if request.tool_choice is None else "tool_choice")
        functions = [tool["function"] for tool in tools]
        if choice == "auto":
            if not self.enable_auto_tool_choice:
                raise bad_request('"auto" tool choice requires the server to be started with --enable-auto-tool-choice and '
                                  '--tool-call-parser; send "required" or a named function instead', "tool_choice")
            return ToolPlan(tools, self.tool_parser)
        if choice == "required":
            return ToolPlan(tools, self.tool_parser, self.tool_parser.grammar(functions, request.parallel_tool_calls is not False))
        named = [f for f in functions if f["name"] == choice.function.name]
        if not named:
            raise bad_request(f"tool_choice names the function {brief(choice.function.name)}, which is not in tools", "tool_choice")
        return ToolPlan(tools, self.tool_parser, self.tool_parser.grammar(named, parallel=False))

    @staticmethod
    def _check_unsupported(request: ChatCompletionRequest) -> None:
        """Fields this server accepts only with the value that asks for nothing (a 400 rather than a silent default)."""
        if request.continue_final_message and request.add_generation_prompt:
            raise bad_request("continue_final_message needs add_generation_prompt to be false", "continue_final_message")

    def template_options(self, request: ChatCompletionRequest) -> tuple[str | None, dict[str, Any]]:
        """The request's own chat template and extra template variables, refused where they would reach
        past the template's variables: a template sent in a request runs as code on the server (vLLM's
        GHSA-6fvq-23cw-5628), so it needs `--trust-request-chat-template`."""
        kwargs = dict(request.chat_template_kwargs or {})
        template, param = request.chat_template, "chat_template"
        if "chat_template" in kwargs:
            template, param = kwargs.pop("chat_template"), "chat_template_kwargs"
        if template is not None and not self.limits.trust_request_chat_template:
            raise bad_request(
                "a chat template sent with the request is refused: it would run as code on the server; the server's "
                "operator can allow it with --trust-request-chat-template", param,
            )
        if template is not None and not isinstance(template, str):
            raise bad_request(f"chat_template must be a string, got {brief(template)}", param)
        reserved = sorted(set(kwargs) & _apply_chat_template_parameters(self.tokenizer))
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may only hold variables of the chat template, not {', '.join(reserved)} "
                "(parameters of the template call itself)", "chat_template_kwargs",
            )
        return template, kwargs

    def render(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True, continue_final_message: bool = False,
        template: str | None = None, template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of `messages` rendered with the chat template and `tools` (400 if there is no template, it
        fails, or it renders no tools). Runs off the event loop (through `preprocess`)."""
        if not messages:
            raise bad_request("messages must hold at least one message", "messages")
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"the model `{self.served_model_name}` has no chat template, so chat requests cannot be rendered; "
                "use /v1/completions with a plain prompt",
                "messages",
                "chat_template_missing",
            )
        if tools and not _renders_tools(self.tokenizer, template):
            raise bad_request(
                f"the chat template of `{self.served_model_name}` has no tool support (it renders no tools), so the model "
                "would never see them; start the server with a template that does (--chat-template; "
                "docs/tool_chat_template_hermes.jinja is one for ChatML models), or send one with the request", "tools",
                "tools_unsupported_by_template",
            )
        conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, tools=tools, **(template_kwargs or {}),
            )
        except Exception as exc:  # template code raising on this input (roles out of order, ...): the input's fault
            raise bad_request(f"cannot render the messages with the chat template: {brief(str(exc))}", "messages") from None
        return self.encode(text, add_special_tokens=False)

    def _response(
        self, request: ChatCompletionRequest, handle: Choices, finals: dict[int, RequestOutput], prompt_len: int,
        parser: type[HermesToolParser] | None,
    ) -> ChatCompletionResponse:
        out = finals[0]
        choices = []
        for i, completion in enumerate(out.outputs):
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(self.token_logprobs(out, i, new_only=False), request.top_logprobs or 0)
            content, calls = parser.extract(completion.text) if parser is not None else (completion.text, [])
            choices.append(ChatCompletionChoice(
                index=i, message=AssistantMessage(role=self.role(request), content=content, tool_calls=[_tool_call(c) for c in calls]),
                logprobs=logprobs, finish_reason=_finish_reason(completion.finish_reason, bool(calls)), stop_reason=completion.stop_reason,
            ))
        usage = self.usage([prompt_len], [out])
        return ChatCompletionResponse(id=handle.response_id, model=self.served_model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: ChatCompletionRequest, handle: Choices, prompt_len: int, parser: type[HermesToolParser] | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        tool_streams = {index: ToolCallStream(parser) for index in range(request.n)} if parser is not None else {}

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=handle.response_id, created=created, model=self.served_model_name,
                                           choices=[choice]).model_dump_json())

        for index in range(request.n):
            yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role=self.role(request), content=""), logprobs=None, finish_reason=None))
        finals: list[RequestOutput] = []
        ended: set[int] = set()  # choices whose finish_reason was sent
        try:
            async for _, out in handle:
                if out.error is not None:
                    yield sse(OpenAIError(500, out.error, "internal_server_error", None, "request_failed").body.model_dump_json())
                    break
                if out.finished:
                    finals.append(out)
                for index, completion in enumerate(out.outputs):
                    if index in ended:
                        continue
                    logprobs = None
                    if request.logprobs and out.new_token_ids[index]:
                        logprobs = self._logprobs(self.token_logprobs(out, index, new_only=True), request.top_logprobs or 0)
                    text, calls = out.new_text[index], []
                    tools = tool_streams.get(index)
                    if tools is not None:
                        text, calls = tools.feed(text)
                        if completion.finish_reason is not None:
                            rest, last = tools.finish()
                            text, calls = text + rest, calls + last
                    if text or logprobs is not None:
                        yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text),
                                                               logprobs=logprobs, finish_reason=None))
                    first = len(tools.calls) - len(calls) if tools is not None else 0
                    for k, call in enumerate(calls):
                        yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(tool_calls=[_delta_tool_call(first + k, call)]),
                                                               logprobs=None, finish_reason=None))
                    if completion.finish_reason is not None:
                        ended.add(index)
                        called = tools is not None and bool(tools.calls)
                        yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), logprobs=None,
                                                               finish_reason=_finish_reason(completion.finish_reason, called),
                                                               stop_reason=completion.stop_reason))
        except Exception as exc:
            error = engine_error(exc)
            if error is None:
                raise
            yield sse(error.body.model_dump_json())
        if request.stream_options is not None and request.stream_options.include_usage:
            usage = self.usage([prompt_len], finals)
            yield sse(ChatCompletionChunk(id=handle.response_id, created=created, model=self.served_model_name,
                                          choices=[], usage=usage).model_dump_json())
        yield sse("[DONE]")

    @staticmethod
    def _logprobs(tokens: list[TokenLogprobs], top: int) -> ChatLogProbs:
        return ChatLogProbs(content=[
            ChatLogProbsContent(
                **_logprob_fields(token.token, token.logprob),
                top_logprobs=[ChatLogProb(**_logprob_fields(text, logprob)) for text, logprob in token.alternatives[:top]],
            )
            for token in tokens
        ])


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for an output that ended by itself (not cut by max_tokens) having called tools."""
    return "tool_calls" if called and reason == "stop" else reason


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _delta_tool_call(index: int, call: ParsedCall) -> DeltaToolCall:
    """A whole call as one streamed piece (OpenAI's clients accumulate pieces by index)."""
    return DeltaToolCall(index=index, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments=call.arguments))


@functools.lru_cache(maxsize=16)
def _renders_tools(tokenizer: Any, template: str | None) -> bool:
    """Whether the chat template (`template`, or the tokenizer's) shows the model the tools it is given."""
    conversation = [{"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # a template that fails with tools has no tool support either
        return False
    return _PROBE_TOOL["function"]["name"] in text


def _logprob_fields(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _message_dict(message: ChatMessage, position: int) -> dict[str, Any]:
    """The message as the chat template sees it: its fields as sent, the content as one text, and the arguments
    of an assistant's `tool_calls` as objects (OpenAI sends them as JSON text; templates write them with tojson)."""
    fields = message.model_dump(exclude_none=True)
    fields["content"] = _message_text(message, position)
    for call in fields.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                raise bad_request(f"messages[{position}].tool_calls: function.arguments must be JSON text, got "
                                  f"{brief(function['arguments'])}", "messages") from None
    return fields


@functools.cache
def _call_parameters(tokenizer_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(tokenizer_class.apply_chat_template).parameters) - {"self", "kwargs"}


def _apply_chat_template_parameters(tokenizer: Any) -> frozenset[str]:
    """The parameters of `apply_chat_template` itself (tokenize, return_tensors, ...), which no request may set."""
    return _call_parameters(type(tokenizer))


def _message_text(message: ChatMessage, position: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{position}].content: only text parts are supported, got type {part.type!r}", "messages")
        texts.append(part.text)
    return "".join(texts)
