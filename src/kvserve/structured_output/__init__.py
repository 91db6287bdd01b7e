"""Structured output: constraints compiled to grammars (xgrammar), one matcher per output, token bitmasks."""
