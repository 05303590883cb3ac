"""One error type for bad user input: it names the problem and the fix.

The CLI prints it as one line and exits with code 2 (3 for "no plan fits").
Pure standard library, so the device runtime can use it.
"""


class UserError(Exception):
    """Bad input from the user: `problem` says what is wrong, `fix` what to do."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" — fix: {fix}" if fix else ""))
