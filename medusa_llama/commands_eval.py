"""CLI subcommands (placeholder until written)."""


def register(sub) -> None:
    pass
