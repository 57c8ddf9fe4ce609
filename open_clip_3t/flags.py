"""Command-line conventions every command of the package shares (training.main, training.eval, the cache, export,
publish): `--help` shows each flag's default, and a renamed flag keeps its old spelling for one release, hidden from
`--help`, with a one-line deprecation warning.

RENAMED lists every old spelling (docs/training.md#renamed-flags shows the table; tests check the docs use none).
"""
import argparse
import sys

# (command, old spelling) -> new spelling. The old spellings go in the release after 0.2.
RENAMED = {
    ("training.main", "--three-towers-loss-weights"): "--third-tower-loss-weights",
    ("training.main", "--three-towers-transfer"): "--third-tower-transfer",
    ("training.main", "--three-towers-head"): "--third-tower-head",
    ("training.main", "--init-image-from-third-tower"): "--third-tower-init-image",
    ("training.main", "--cache-missing"): "--third-tower-cache-missing",
    ("training.eval", "--checkpoint"): "--pretrained",
    ("open_clip_3t.cache build", "--out"): "--third-tower-cache",
    ("open_clip_3t.cache build", "--tower"): "--third-tower",
    ("open_clip_3t.cache verify", "--cache"): "--third-tower-cache",
    ("open_clip_3t.cache verify", "--tower"): "--third-tower",
    ("open_clip_3t.cache info", "--cache"): "--third-tower-cache",
    ("open_clip_3t.cache merge", "--out"): "--third-tower-cache",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter ("(default: fp32)"), silent where a default says nothing (None, False, a
    suppressed one) or the help text already names it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Renamed(argparse.Action):
    """The old spelling of a flag: stores into the new flag's destination and says once that it is deprecated."""

    def __init__(self, option_strings, dest, new=None, command=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.command = new, command

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"python -m {self.command}: warning: {option_string} is deprecated: use {self.new} (the old spelling "
              f"goes in the next release)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if values is None and self.nargs == "?" else values)


def add_renamed(parser, command, new_action):
    """Accept each old spelling RENAMED lists for `new_action` (an action of `parser`, or of a group of it) in
    `command`: same destination, nargs, type and choices; hidden from --help."""
    for (cmd, old), new in RENAMED.items():
        if cmd == command and new in new_action.option_strings:
            parser.add_argument(old, dest=new_action.dest, nargs=new_action.nargs, const=new_action.const,
                                type=new_action.type, choices=new_action.choices, metavar=new_action.metavar,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_Renamed, new=new,
                                command=command)
    return new_action
