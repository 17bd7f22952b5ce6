"""``sam3d --help`` explains the tool with examples, and every option says what it does."""

from __future__ import annotations

import argparse

from sam3d.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_top_level_help_has_a_description_and_examples(capsys):
    parser = build_parser()
    text = parser.format_help()
    assert "Segment Anything adapted to medical images" in text
    assert "examples:" in text
    # every example names a real subcommand and parses
    examples = [ln.strip() for ln in text.split("examples:")[1].splitlines() if ln.strip()]
    commands = [ln for ln in examples if ln.startswith("sam3d ")]
    assert len(commands) >= 5
    subs = _subparsers(parser)
    for line in commands:
        assert line.split()[1] in subs, line


def test_every_option_of_every_command_has_help():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_defaults_are_said_in_the_help():
    subs = _subparsers(build_parser())
    assert "8000" in subs["serve"].format_help()
    assert "demo_out" in subs["demo"].format_help()
    assert "--dataset" in subs["segment-batch"].format_help()
