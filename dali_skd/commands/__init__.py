"""The commands: one module each, importing the core (`dali_skd`) and `preprocess`, never one another. `cli.py`
parses a command's flags into its config and calls its one function."""
