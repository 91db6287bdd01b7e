"""Speculative decoding: cheap proposals for a sequence's next tokens, verified in one step of the target model."""
