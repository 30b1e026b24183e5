""" Command line: `python -m timm_lossattn COMMAND [ARGS]`

Each command lives in the module that owns the feature and exposes `main(argv) -> int`; this module only
dispatches, importing the command's module on demand so `--help` stays fast.
"""
import importlib
import sys
from typing import List, Optional

__all__ = ['COMMANDS', 'main']

# command -> (module, function, one-line help)
COMMANDS = {
    'explain': ('timm_lossattn.explain_cli', 'main', 'explain images: heat maps, selected patches, boxes (PNG + JSON)'),
    'train': ('timm_lossattn.train', 'main', 'train a model on an ImageFolder or the built-in digits'),
    'demo': ('timm_lossattn.train', 'demo_main', 'train a small model on the digits, explain and score it'),
    'hub': ('timm_lossattn.hub', 'main', 'export, verify and push checkpoints in Hugging Face Hub layout'),
}


def _usage() -> str:
    lines = ['usage: python -m timm_lossattn COMMAND [ARGS]', '', 'commands:']
    lines += [f'  {name:<8} {help_text}' for name, (_, _, help_text) in COMMANDS.items()]
    lines += ['', 'Run `python -m timm_lossattn COMMAND --help` for the arguments of a command.']
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f'error: unknown command {command!r}\n\n{_usage()}', file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    return int(getattr(module, function_name)(rest) or 0)
