from zseg.pipeline.cli import entry

entry()
