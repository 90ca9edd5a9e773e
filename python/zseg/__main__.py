from zseg.cli import entry

entry()
