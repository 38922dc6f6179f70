"""The one exception the data path raises for bad input: a one-line message saying what and where."""


class DataError(ValueError):
    """Bad corpus, store or loader input (missing manifest, empty corpus, unknown name, ...)."""
