"""(placeholder: commands of this group are added by their stage's work)"""

from pipeline.cli.app import app  # noqa: F401
