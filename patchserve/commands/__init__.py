"""One module per subcommand: ``get_args_parser()`` and ``main(args)``."""
