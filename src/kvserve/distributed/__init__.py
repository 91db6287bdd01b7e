"""Running one model on several ranks: who holds which shard (`parallel_state`), the collectives the layers call
(`communication`), and Python objects over a process group (`object_channel`)."""
