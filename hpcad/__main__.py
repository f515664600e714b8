from hpcad.cli import entry

entry()
