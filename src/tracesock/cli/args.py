"""What every ``tracesock`` subcommand's argument parser shares."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line naming it (argparse's own messages do), then exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
