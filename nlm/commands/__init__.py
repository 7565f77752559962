"""One module per `nlm` command. Each has a docstring (its first line is the command's help), an `Options`
pydantic model (its flags, environment variables and YAML keys; see `nlm.commands.options`) and
`run(options) -> int`, which imports heavy libraries inside and calls one library function.
The name -> module table is `nlm.cli.COMMANDS`."""
