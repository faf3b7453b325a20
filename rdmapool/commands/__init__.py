"""One module per `rdmapool` subcommand; each defines `register(subparsers)`. Imports of heavy dependencies
(torch, transformers) stay inside the command functions so `rdmapool --help` is instant."""
