"""One vocabulary: every flag the docs and the SLURM launchers show is a current flag of the command it is given to
(parsed by that command's own parser, not found in its help text), renamed flags keep their old spelling for one
release with one warning line, `--help` shows defaults in one usage block."""
import contextlib
import io
import re
from functools import lru_cache
from pathlib import Path

import pytest

from open_clip_3t.flags import RENAMED
from tests.conftest import REPO
from tests.docs_blocks import blocks, commands, pages
from tests.test_docs import prose, split_commands
from tests.test_slurm_stub import run_launcher


@lru_cache(maxsize=None)
def parser_of(command):
    """The real argparse parser of `command` ("training.main", "open_clip_3t.cache build", ...)."""
    if command == "training.main":
        from training.flags import make_parser
        return make_parser()
    if command == "training.eval":
        from training.eval import parse_args
        return parse_args(["--out", "x"])[0]
    if command.startswith("open_clip_3t.cache "):
        from open_clip_3t.cache.cli import make_parser
        return make_parser()[1].choices.get(command.split()[1])  # None: not a subcommand (an error line quoted)
    if command in ("open_clip_3t.export", "open_clip_3t.publish"):
        from importlib import import_module
        return import_module(command).make_parser()
    return None


def current_flags(command):
    """The option strings `--help` shows (the old spellings are hidden)."""
    return {flag for action in parser_of(command)._actions if action.help != "==SUPPRESS=="
            for flag in action.option_strings}


def shown_commands():
    """(where, command, flags) of every `python -m MODULE ...` of the docs: their bash blocks and inline code."""
    found = []
    for page in pages():
        texts = [(f"{b}", b.text) for b in blocks(page) if b.lang == "bash"]
        texts += [(f"{page} (prose)", span) for span in re.findall(r"`(python -m [^`]+)`", prose(page))]
        for where, text in texts:
            for line in commands(text):
                try:
                    split = split_commands(line)
                except ValueError:  # prose: an apostrophe, not a quote
                    split = [line.split()]
                for words in split:
                    words = [w for w in words if w != "..."]
                    for i, word in enumerate(words[:-1]):
                        if word == "-m" and words[i + 1].startswith(("training.", "open_clip_3t.")):
                            command, args = words[i + 1], words[i + 2:]
                            if command == "open_clip_3t.cache" and args:
                                command, args = f"{command} {args[0]}", args[1:]
                            if parser_of(command) is not None:
                                found.append((where, command, [a.strip("[]").split("=")[0] for a in args
                                                               if re.match(r"--\w", a.strip("[]"))]))
    return found


def test_every_flag_the_docs_show_is_a_current_flag_of_its_command():
    found = shown_commands()
    assert len(found) > 40 and {c for _, c, _ in found} >= {
        "training.main", "training.eval", "open_clip_3t.cache build", "open_clip_3t.cache verify",
        "open_clip_3t.cache info", "open_clip_3t.cache merge", "open_clip_3t.export", "open_clip_3t.publish"}
    bad = [(where, command, flag) for where, command, flags in found for flag in flags
           if flag not in current_flags(command)]
    assert not bad, f"flags the docs show that their command does not take (or only as an old spelling): {bad}"


def test_the_docs_use_no_old_spelling_outside_the_renamed_table():
    """An old spelling that is no current flag of any command appears only in training.md's table of them."""
    commands_ = {command for command, _ in RENAMED} | {"open_clip_3t.export", "open_clip_3t.publish"}
    every = set().union(*(current_flags(c) for c in commands_))
    old = sorted({flag for (_, flag) in RENAMED} - every)
    assert old == ["--cache", "--cache-missing", "--checkpoint", "--init-image-from-third-tower",
                   "--three-towers-head", "--three-towers-loss-weights", "--three-towers-transfer", "--tower"]
    table = re.search(r"### Renamed flags\n.*?\n\n(\|.*?)\n\n", (Path(REPO) / "docs/training.md").read_text(), re.S)
    rows = [tuple(cell.strip(" `") for cell in row.split("|")[1:-1]) for row in table.group(1).splitlines()[2:]]
    assert rows == [(command, flag, new) for (command, flag), new in RENAMED.items()]
    for page in pages():
        text = (Path(REPO) / page).read_text().replace(table.group(1), "") if page == "docs/training.md" else \
            (Path(REPO) / page).read_text()
        text = re.sub(r"warning: --cache-missing is deprecated", "", text)  # the warning, quoted
        used = [flag for flag in old if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
        assert not used, f"{page} still uses {used}: write the new spelling (docs/training.md#renamed-flags)"


@pytest.mark.parametrize("command, old, new", [(c, o, n) for (c, o), n in RENAMED.items()])
def test_an_old_spelling_still_parses_with_one_warning(command, old, new, capsys):
    parser = parser_of(command)
    action = next(a for a in parser._actions if new in a.option_strings)
    value = [] if action.nargs == "?" else (["1", "0", "1"] if action.nargs == "+" and action.type is float else
                                            [action.choices[-1] if action.choices else "/x"])
    required = [] if command != "training.eval" else ["--out", "o"]
    if command == "open_clip_3t.cache merge":
        required = ["part"]
    if command in ("open_clip_3t.cache build", "open_clip_3t.cache verify"):
        required = ["--train-data", "x.tar", "--model", "3T-tiny"]
    args_old = parser.parse_known_args([*required, old, *value])[0]
    err = capsys.readouterr().err.splitlines()
    args_new = parser.parse_known_args([*required, new, *value])[0]
    assert getattr(args_old, action.dest) == getattr(args_new, action.dest) not in (None, False)
    assert err == [f"python -m {command}: warning: {old} is deprecated: use {new} (the old spelling goes in the "
                   f"next release)"]
    assert capsys.readouterr().err == ""


def test_help_shows_defaults_in_one_usage_block():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parser_of("training.main").print_help()
    text = out.getvalue()
    assert text.count("usage:") == 1 and "--third-tower-cache-missing {error,skip,online}" in text
    assert "(default: error)" in text and "(default: 600)" in text  # ours, and OpenCLIP's --batch-size:
    assert re.search(r"--batch-size BATCH_SIZE\s+Batch size per GPU. \(default: 64\)", text)
    for old in ("--cache-missing", "--three-towers-head", "--init-image-from-third-tower"):
        assert not re.search(rf"(?<![\w-]){old}(?![\w-])", text)
    assert "(default: fp32)" in parser_of("open_clip_3t.cache build").format_help()
    assert "(default: fp32)" not in parser_of("training.eval").format_help()  # its help says why fp32:
    assert "fp32 by default: the figures then equal" in parser_of("training.eval").format_help()
    export = " ".join(parser_of("open_clip_3t.export").format_help().split())
    assert "transfer terms' temperatures and biases dropped)." in export and "--push-to-hub ORG/NAME" in export


@pytest.mark.parametrize("script, module, variables", [
    ("train.sbatch", "training.main", {"MODEL": "3T-tiny", "THIRD_TOWER_WEIGHTS": "/w/h.pth",
                                       "THIRD_TOWER_CACHE": "/cache/h"}),
    ("build_cache.sbatch", "open_clip_3t.cache", {"THIRD_TOWER_CACHE": "/cache/h", "TOWER": "third",
                                                  "THIRD_TOWER_WEIGHTS": "/w/h.pth"}),
    ("eval.sbatch", "training.eval", {"CHECKPOINT": "/run/checkpoints/epoch_1.pt", "ZEROSHOT_DATA": "/zs",
                                      "VAL_DATA": "/val/0.tar", "COMBINE_WITH": "/lit.pt"}),
])
def test_the_launchers_command_lines_parse_without_an_old_spelling(script, module, variables, tmp_path, capsys):
    """Each launcher, run with a stub srun that records its command line: the command's own parser takes every word
    of it, and no old spelling is among them."""
    proc = run_launcher(script, tmp_path, {"SLURM_JOB_NODELIST": "localhost", **variables})
    assert proc.returncode == 0, proc.stderr
    words = (tmp_path / "srun_args.txt").read_text().splitlines()
    args = words[words.index(module) + 1:]
    command = module if module != "open_clip_3t.cache" else f"{module} {args.pop(0)}"
    parsed, unknown = parser_of(command).parse_known_args(args)
    assert unknown == [] and capsys.readouterr().err == ""
    if command == "training.eval":
        assert (parsed.pretrained, parsed.precision, parsed.combine_with) == (variables["CHECKPOINT"], "amp",
                                                                            "/lit.pt")
    if command == "open_clip_3t.cache build":
        assert (parsed.cache, parsed.tower, parsed.precision) == ("/cache/h", "third", "fp16")
    if command == "training.main":
        assert (parsed.third_tower_cache, parsed.third_tower_weights) == (["/cache/h"], ["/w/h.pth"])
