"""GrammarCompiler: a request's `StructuredOutputsParams` -> an xgrammar grammar over this model's vocabulary.

xgrammar was chosen over llguidance by measuring both on this project's default model (vocabulary 49,152,
docs/STRUCTURED_OUTPUT.md): a next-token mask costs 1.5 us (median) against 11-16 us, a typical schema
compiles in 3.4 ms against 1.1 ms (llguidance defers its work to the masks). xgrammar is imported at the
first constraint, not with kvserve (it takes ~0.6 s), and keeps compiled grammars in its own cache, keyed
by the constraint, so a schema sent again costs nothing.

The compiler is shared by the threads that may compile (the server compiles a request's constraint off its
event loop, so that a bad one is a 400 before anything is queued, and the engine thread finds it cached);
xgrammar's compiler is thread-safe, and the one lock here guards only its construction.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from kvserve.sampling_params import StructuredOutputsParams
from kvserve.structured_output.grammar_state import GrammarState

_CACHE_LIMIT_BYTES = 64 << 20
# JSON may hold whitespace between its tokens, as vLLM allows, but at most this many characters in a row: a
# small model can otherwise fill max_tokens with newlines (SmolLM2-135M did, sampling at 0.7)
MAX_WHITESPACE = 20
_DESCRIPTIONS = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
                 "grammar": "grammar", "structural_tag": "structural tag"}
_SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[00:24:10] /project/cpp/regex_converter.cc:94: "


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        """`vocab_size`: the width of the model's logits (the bitmask covers it; ids the tokenizer lacks are never
        allowed); `stop_token_ids`: the tokens that end an output (EOS), allowed once the grammar is complete."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _xgrammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs needs the tokenizer, which skip_tokenizer_init=True left unloaded")
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=_CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of `params` (from the cache when it was compiled before); a ValueError naming
        `structured_outputs` when the schema, regex, grammar or structural tag does not compile."""
        compiler = self._xgrammar_compiler()
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                whitespace = {"any_whitespace": False} if params.disable_any_whitespace else \
                    {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE}
                if kind == "json":
                    return compiler.compile_json_schema(json.dumps(params.json), **whitespace)
                # any object: its properties are free (strict mode would allow only {})
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            return compiler.compile_structural_tag(json.dumps(params.structural_tag))
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors for bad input
            lines = str(exc).strip().splitlines()
            message = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
            raise ValueError(f"structured_outputs: the {_DESCRIPTIONS[kind]} does not compile: {message[:500]}") from None

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher for one output of a request constrained by `params`."""
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compile(params)), self.vocab_size)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices` (string literals escaped as JSON escapes them,
    which is how xgrammar's EBNF reads them)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
