"""The one exception type the bridge raises for bad input.

Its message is a single line that names the file / tensor / field and what was expected; the CLIs
print it (without a traceback) and exit non-zero.
"""


class ConversionError(Exception):
    """Bad input or an unsupported model: the message says what and where, in one line."""
