"""CLI subcommands. Each module has add_parser(subparsers) and run(args); heavy imports stay inside run()."""
