"""Benchmarks (not tests): each module defines HELP, add_arguments(parser) and run(args) -> dict."""
