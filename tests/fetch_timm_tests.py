"""Fetch the test suite of the installed timm version from its sdist on PyPI (timm's wheel has no tests).

Run once before pytest: `python tests/fetch_timm_tests.py`. It uses `pip download` (PyPI, or the index pip is
configured with) and unpacks `tests/` into `.cache/timm-<version>/`. Nothing else is downloaded.
"""
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

CACHE = Path(__file__).resolve().parent.parent / '.cache' / f'timm-{timm.__version__}'


def main() -> int:
    if (CACHE / 'tests' / 'test_models.py').exists():
        print(f'timm {timm.__version__} tests already in {CACHE}')
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
             '--dest', tmp, f'timm=={timm.__version__}'],
            check=True)
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        prefix = f'timm-{timm.__version__}/tests/'
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            CACHE.mkdir(parents=True, exist_ok=True)
            tar.extractall(CACHE.parent, members=members, filter='data')
    print(f'timm {timm.__version__} tests unpacked into {CACHE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
