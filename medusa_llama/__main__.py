"""``python -m medusa_llama`` = the ``medusa-llama`` command."""

from medusa_llama.cli import main

main()
