"""Re-hash a release directory against its release.json; exit 1 on any difference.

    python pipeline/verify.py runs/release/<name>
"""

import sys
from pathlib import Path

from hybridquant import release
from hybridquant.errors import UserError


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python pipeline/verify.py <release dir>", file=sys.stderr)
        return 2
    try:
        problems = release.verify(Path(argv[0]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        print(f"error: release {argv[0]} does not match its manifest: {shown}", file=sys.stderr)
        return 1
    print(f"release {argv[0]}: every file matches {release.MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
