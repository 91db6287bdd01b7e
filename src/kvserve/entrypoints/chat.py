"""`kvserve chat`: an interactive terminal chat on the model's chat template.

Each turn re-renders the whole conversation, so the engine's prefix cache finds
the earlier turns' KV blocks and only the new tokens are computed; `--verbose`
prints how many prompt tokens came from the cache.
"""

from __future__ import annotations

import itertools
from typing import Any, TextIO

from kvserve.engine.llm_engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams


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
        raise ValueError("this model's tokenizer has no chat template; use `kvserve generate` for plain completion")
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tokenize=False, **(chat_template_kwargs or {}),
    )


def stream_reply(engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams, out: TextIO) -> RequestOutput:
    """Run one request to completion, writing its text to `out` as it is produced."""
    engine.add_request(request_id, prompt_ids, params)
    final: RequestOutput | None = None
    while final is None:
        for output in engine.step():
            if output.request_id == request_id:
                out.write(output.new_text[0])
                out.flush()
                if output.finished:
                    final = output
    return final


def run_chat_session(engine: LLMEngine, params: SamplingParams, system: str | None, verbose: bool, inp: TextIO, out: TextIO) -> int:
    """Read user turns from `inp` until EOF or /exit; `/reset` starts a new conversation."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    counter = itertools.count()
    out.write("kvserve chat — type /exit to quit, /reset to start over.\n")
    while True:
        out.write("\n>>> ")
        out.flush()
        line = inp.readline()
        if not line:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": text})
        prompt_ids = chat_prompt_ids(engine.tokenizer, messages)
        final = stream_reply(engine, f"chat-{next(counter)}", prompt_ids, params, out)
        out.write("\n")
        if final.error is not None:
            out.write(f"[no reply: {final.error}]\n")
            messages.pop()
            continue
        reply = final.outputs[0]
        messages.append({"role": "assistant", "content": reply.text})
        if verbose:
            out.write(
                f"[prompt {len(prompt_ids)} tokens, {final.num_cached_tokens} from the prefix cache; "
                f"{len(reply.token_ids)} generated, finish_reason={reply.finish_reason}]\n"
            )
