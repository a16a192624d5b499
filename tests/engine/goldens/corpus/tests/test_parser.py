from src.parser import Parser, parse_config


def test_parse_config():
    assert parse_config("a = 1") == {"a": "1"}


class TestParser:
    def test_parser_empty(self):
        assert Parser("").parse() == {}
