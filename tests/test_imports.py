"""The core must import without torchvision or the producers package (it reads tables only)."""

import subprocess
import sys


def test_core_import_pulls_in_neither_producers_nor_torchvision():
    code = (
        "import sys, logitguard, logitguard.cli, logitguard.report.summary;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'producers', 'torchvision'});"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_source_never_mentions_producers():
    from pathlib import Path

    import logitguard

    for path in Path(logitguard.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert "import producers" not in text and "from producers" not in text, path
