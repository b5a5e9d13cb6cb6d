"""The ``mmssl`` subcommands, one module per command, named after it: ``mmssl X Y`` lives in
``mmssl/commands/X_Y.py`` (dashes become underscores), with ``add_arguments(parser)`` and
``run(args) -> int``. The top layer: a command parses its options and calls the library
(``mmssl.data``, ``mmssl.train``, ``mmssl.eval``...); nothing in the library imports a command.
``mmssl.cli`` lists them and imports only the one asked for.
"""
