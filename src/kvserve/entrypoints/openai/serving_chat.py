"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, assistant replies out.

A stream sends, per choice, a chunk with `delta.role` first, then `delta.content`
chunks, then a chunk carrying `finish_reason`; then an optional usage chunk and
`data: [DONE]`, as OpenAI does.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator
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
    DeltaMessage,
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
from kvserve.validation import brief
from kvserve.outputs import RequestOutput


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], limits: ServerLimits | None = None,
                 response_role: str = "assistant") -> None:
        super().__init__(engine, served_model_names, limits)
        self.response_role = response_role  # vLLM's --response-role

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
        prompt_ids = await self.preprocess(
            lambda: self.render(request.messages, request.add_generation_prompt, request.continue_final_message, template, template_kwargs),
            "messages",
        )
        if request.max_completion_tokens is not None:
            max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = request.max_tokens, "max_tokens"
        max_tokens = self.max_tokens_for(len(prompt_ids), max_tokens, max_tokens is not None, param)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        renamed = {"max_tokens": param, "logprobs": "top_logprobs", "best_of": "n"}
        params = self.sampling_params(request, max_tokens, logprobs, None, renamed)
        handle = await self.submit("chatcmpl", [PromptRequest(0, prompt_ids, params)], "messages", renamed)
        if request.stream:
            return SSEResponse(self._stream(request, handle, len(prompt_ids)), handle.abort, self.limits.stream_stall_timeout_s)
        try:
            finals = await run_until_disconnect(raw_request, handle.final_outputs())
        finally:
            handle.abort()
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        check_outputs(finals)
        return self._response(request, handle, finals, len(prompt_ids))

    @staticmethod
    def _check_unsupported(request: ChatCompletionRequest) -> None:
        """Fields this server accepts only with the value that asks for nothing (a 400 rather than a silent default)."""
        if request.tools:
            raise bad_request("tools are not supported", "tools")
        if request.tool_choice not in (None, "none"):
            raise bad_request(f'tool_choice must be "none" (tools are not supported), got {brief(request.tool_choice)}', "tool_choice")
        if request.response_format is not None and request.response_format != {"type": "text"}:
            raise bad_request(
                f'response_format {brief(request.response_format)} is not supported (structured output is not implemented); '
                'only {"type": "text"}', "response_format",
            )
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
        template: str | None = None, template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of `messages` rendered with the chat template (400 if there is none or it fails).
        Runs off the event loop (through `preprocess`)."""
        if not messages:
            raise bad_request("messages must hold at least one message", "messages")
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"the model `{self.served_model_name}` has no chat template, so chat requests cannot be rendered; "
                "use /v1/completions with a plain prompt",
                "messages",
                "chat_template_missing",
            )
        conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **(template_kwargs or {}),
            )
        except Exception as exc:  # template code raising on this input (roles out of order, ...): the input's fault
            raise bad_request(f"cannot render the messages with the chat template: {brief(str(exc))}", "messages") from None
        return self.encode(text, add_special_tokens=False)

    def _response(
        self, request: ChatCompletionRequest, handle: Choices, finals: dict[int, RequestOutput], prompt_len: int
    ) -> ChatCompletionResponse:
        out = finals[0]
        choices = []
        for i, completion in enumerate(out.outputs):
            logprobs = None
            if request.logprobs:
                logprobs = self._logprobs(self.token_logprobs(out, i, new_only=False), request.top_logprobs or 0)
            choices.append(ChatCompletionChoice(
                index=i, message=AssistantMessage(role=self.role(request), content=completion.text), logprobs=logprobs,
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
            ))
        usage = self.usage([prompt_len], [out])
        return ChatCompletionResponse(id=handle.response_id, model=self.served_model_name, choices=choices, usage=usage)

    async def _stream(self, request: ChatCompletionRequest, handle: Choices, prompt_len: int) -> AsyncIterator[str]:
        created = int(time.time())

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
                    if out.new_text[index] or logprobs is not None:
                        yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=out.new_text[index]),
                                                               logprobs=logprobs, finish_reason=None))
                    if completion.finish_reason is not None:
                        ended.add(index)
                        yield chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), logprobs=None,
                                                               finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
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


def _logprob_fields(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _message_dict(message: ChatMessage, position: int) -> dict[str, Any]:
    """The message as the chat template sees it: its fields as sent, the content as one text."""
    fields = message.model_dump(exclude_none=True)
    fields["content"] = _message_text(message, position)
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
