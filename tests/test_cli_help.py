"""Every command line's --help: each flag has a help text and shows its default, and the example commands
of the module docstring keep their line breaks (issue item 12).

The parsers are built in this process (the scripts only run under ``if __name__ == "__main__"``), so the
cost is the imports (torch, Lightning, gradio), paid once for all scripts.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = [ROOT / "train_inpainting.py", ROOT / "test_inpainting.py", ROOT / "test_multiview_inpainting.py",
                ROOT / "test_nvs.py", ROOT / "ref_inpainting_gradio.py", ROOT / "train_realfill.py",
                ROOT / "test_realfill.py", ROOT / "leftrefill" / "commands.py"]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py")) + ENTRY_POINTS


class _ParserBuilt(Exception):
    """Raised in place of parsing, once a script has built its parser."""


def load_script(path: Path) -> ModuleType:
    """Import a script by file path, under a private name (other tests import some under their own)."""
    spec = importlib.util.spec_from_file_location(f"cli_help_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def parser_of(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The script's parser: from build_parser() where there is one, else caught in parse_args()."""
    if hasattr(module, "build_parser"):
        return module.build_parser()
    built = []

    def catch(self, *args, **kwargs):
        built.append(self)
        raise _ParserBuilt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_ParserBuilt):
        module.parse_args([])
    return built[0]


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """One flag's help as --help prints it: its formatter's expansion, "(default: ...)" included."""
    return parser._get_formatter()._expand_help(action)


def continued_example_lines(path: Path) -> list[str]:
    """Each line of the module docstring's source that ends with a line continuation, as --help must
    print it: ending with one backslash and a newline. Read from the source, because in a docstring that
    is not a raw string the backslash-newline is already gone from __doc__."""
    docstring = ast.parse(path.read_text()).body[0]
    lines = path.read_text().splitlines()[docstring.lineno - 1:docstring.end_lineno]
    return [re.sub(r"\\+$", "\\\\", line) + "\n" for line in lines if line.endswith("\\")]


@pytest.fixture(params=SCRIPTS, ids=lambda path: path.name)
def script(request, monkeypatch) -> tuple[Path, argparse.ArgumentParser]:
    path = request.param
    return path, parser_of(load_script(path), monkeypatch)


def with_subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and, for a command with subcommands (leftrefill fill|nvs|realfill), each subcommand's parser."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [parser] + [sub for action in subparsers for sub in action.choices.values()]


def test_every_flag_has_help_and_shows_its_default(script):
    path, top = script
    for parser in with_subcommands(top):
        check_flags(path, parser)


def check_flags(path: Path, parser: argparse.ArgumentParser) -> None:
    full_help = "".join(parser.format_help().split())  # argparse wraps long words (paths) at hyphens too
    actions = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert actions, f"{path.name}: no flags found"
    for action in actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{path.name} {name}: no help text"
        if action.option_strings and not action.required:
            text = shown_help(parser, action)
            assert "(default:" in text, f"{path.name} {name}: default not shown"
            assert text.count("(default:") == 1, f"{path.name} {name}: default stated twice: {text!r}"
            assert "".join(text.split()) in full_help, f"{path.name} {name}: help not in --help"


def test_example_commands_keep_their_line_breaks(script):
    path, parser = script
    help_text = parser.format_help()
    for line in continued_example_lines(path):
        assert line in help_text, f"{path.name}: --help lost the line break of {line!r}"


def test_line_break_check_catches_a_docstring_that_is_not_raw(tmp_path):
    path = tmp_path / "example.py"
    path.write_text('"""Example.\n\n    python example.py --a 1 \\\n        --b 2\n"""\n')
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    help_text = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
                                        ).format_help()
    assert continued_example_lines(path) == ["    python example.py --a 1 \\\n"]
    assert continued_example_lines(path)[0] not in help_text
