"""Importing the module: what it costs after requests, and a bare copy of the file that still works."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code: str, cwd: str) -> str:
    """Run ``code`` in a fresh interpreter that sees only what ``cwd`` holds, and return its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CODEWORDS_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_after_requests_loads_no_other_module():
    """Guards the import cost (goal: <= 3 ms over requests): every module the top of the file
    imports is one that requests has already loaded, and what only one feature needs
    (concurrent.futures for map(), about 1 ms) is imported when that feature is first used."""
    code = (
        "import sys, requests\n"
        "before = set(sys.modules)\n"
        "import codewords_lite\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    assert python(code, ROOT).strip() == "['codewords_lite']"


def test_a_bare_copy_of_the_file_works_untouched(tmp_path, runtime):
    """Guards the single file: copied alone into a project (no wheel, no stub beside it), it imports,
    says its version, and runs, maps and uploads against the emulator."""
    shutil.copy(os.path.join(ROOT, "codewords_lite.py"), tmp_path)
    code = f"""
import json, codewords_lite as cw
assert cw.__file__.startswith({str(tmp_path)!r}), cw.__file__
with cw.Client({runtime.api_key!r}, base_url={runtime.url!r}) as client:
    output = client.run("echo", {{"n": 1}})
    mapped = list(client.map("echo", [{{"i": i}} for i in range(3)]))
    url = client.upload(b"abc", filename="abc.txt")
print(json.dumps([cw.__version__, output, mapped, url.startswith("http")]))
"""
    version, output, mapped, uploaded = json.loads(python(code, str(tmp_path)))
    assert version == python("import codewords_lite; print(codewords_lite.__version__)", ROOT).strip()
    assert output == {"n": 1}
    assert mapped == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert uploaded
