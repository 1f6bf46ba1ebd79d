"""CLI subcommands. Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``, and imports heavy libraries inside ``run`` so ``--help`` stays fast."""
