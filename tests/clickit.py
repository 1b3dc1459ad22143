"""Runs `cli.py` commands in-process, as a user would type them."""

from __future__ import annotations

from click.testing import CliRunner, Result

import cli


def invoke(*args: str, expect_error: bool = False) -> Result:
    result = CliRunner().invoke(cli.main, list(args))
    assert (result.exit_code != 0) == expect_error, result.output + repr(result.exception)
    return result
