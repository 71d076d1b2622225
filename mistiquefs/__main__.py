from mistiquefs.cli.main import entry

entry()
