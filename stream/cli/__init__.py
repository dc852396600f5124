"""Every `tcbf-live` command: argparse lives here and nowhere else (`main.main` is the entry)."""
