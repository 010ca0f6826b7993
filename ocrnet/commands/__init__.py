"""The command line's subcommands, one module each, every one with ``add_parser(sub)`` and
``run(args) -> exit status``; :mod:`ocrnet.commands.errors` is their one error printer."""

from . import bench, configs, convert, demo, infer, test, train

# In the order `ocrnet --help` lists them.
COMMANDS = {"convert": convert, "configs": configs, "train": train, "test": test,
            "infer": infer, "bench": bench, "demo": demo}

__all__ = ["COMMANDS"]
