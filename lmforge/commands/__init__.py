"""One module per `lmforge` subcommand."""
