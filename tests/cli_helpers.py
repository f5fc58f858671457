"""What the tests of refusals share: the one line a refused or failed command prints."""

from __future__ import annotations


def one_line(capsys, code: int, expected: int = 2) -> str:
    """The single stderr line of a command that failed with ``expected``: an ``error:`` line, never a traceback,
    and (for a refusal, exit 2) never the catch-all's ``unexpected``."""
    err = capsys.readouterr().err
    assert code == expected, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err, err
    if expected == 2:
        assert not err.startswith("error: unexpected "), err
    return err

