"""One thin module per subcommand: parse flags, call `cwa.stages`, print the artifact path."""
