"""A tiny configuration parser used by the ranking goldens."""


class Parser:
    """Parser reads key = value lines."""

    def __init__(self, text):
        self.text = text

    def parse(self):
        return dict(line.split(" = ", 1) for line in self.text.splitlines() if line)


def parse_config(text):
    return Parser(text).parse()
