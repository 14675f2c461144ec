"""Running a command in-process as the shell would, for the tests of user errors (one ``error:`` line on
stderr and exit status 2: ``llama.cli``)."""
from llama import cli


def exit_status_and_stderr(command, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``command(argv)``: 0 when it returns, else its ``SystemExit`` code."""
    try:
        command(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def run_as_command(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``main`` run on ``argv`` as ``python -m`` would (``llama.cli.run_command``)."""
    return exit_status_and_stderr(lambda argv: cli.run_command(main, argv), argv, capsys)


def assert_one_line(code: int, err: str, expected: str) -> None:
    """Exit status 2 and stderr the single line ``error: ...`` containing ``expected``."""
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (code, err)
