from itertrain.cli import entry

entry()
