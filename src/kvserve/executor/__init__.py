"""Executors: how the model runs — in this process (UniprocExecutor) or, later, across ranks — behind one interface."""
