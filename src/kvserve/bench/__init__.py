"""Benchmarks behind `kvserve bench`: each module adds one subcommand (serve, ...)."""
