"""Write the settings tables into README.md between their markers (`--check`: fail if they differ)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tables() -> dict[str, str]:
    import model_service.cli
    import preproc_service.cli
    from splitserve_common.settings import settings_table

    return {"model-service": settings_table(model_service.cli.OPTIONS, model_service.cli.ENV_PREFIX),
            "preproc-service": settings_table(preproc_service.cli.OPTIONS, preproc_service.cli.ENV_PREFIX)}


def render(readme: str) -> str:
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- settings:{name} -->\n).*?(<!-- /settings:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md lacks the <!-- settings:{name} --> markers")
        readme = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = render(current)
    if "--check" in sys.argv:
        if wanted != current:
            print("README.md settings tables differ from the code: run python scripts/readme_settings.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
