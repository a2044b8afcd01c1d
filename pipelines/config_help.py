"""``lorelay STAGE --help-config``: every config key with its default and help.

Keys are never cut or wrapped, whatever the terminal width: the help column wraps instead, and
below the width a table needs the keys are listed one per line with the help indented under them.
Help strings are plain text (``[embed_tokens, lm_head]`` is shown as written, never read as rich
markup), and defaults are the YAML a user would write.
"""

from __future__ import annotations

from stages.core.config import describe

HELP_MIN_WIDTH = 24  # narrower than this, the help column would be a few words a line: list instead


def print_config_help(config_class, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    rows = describe(config_class)
    key_width = max(len(key) for key, _, _ in rows)
    default_width = min(max(len(default) for _, default, _ in rows), 20)  # longer ones fold
    # a rich table: 3 columns, each padded by one space either side, and 4 vertical rules
    if console.width >= key_width + default_width + HELP_MIN_WIDTH + 10:
        table = Table(title=config_class.__name__)
        table.add_column("key", no_wrap=True, min_width=key_width)
        table.add_column("default", overflow="fold", max_width=default_width)
        table.add_column("help", overflow="fold")
        for key, default, help_text in rows:
            table.add_row(Text(key), Text(default), Text(help_text))
        console.print(table)
        return
    console.print(Text(config_class.__name__, style="bold"))
    for key, default, help_text in rows:
        console.print(Text.assemble((key, "bold"), f": {default}"), soft_wrap=True)
        for line in Text(help_text).wrap(console, max(console.width - 4, 16)):
            line.rstrip()
            console.print(Text("    ") + line, soft_wrap=True)
