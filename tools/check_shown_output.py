"""Run every `$ mumoe ...` command shown in README.md and docs/*.md and compare what it prints with what the page
shows, times masked. A `...` line in a shown block stands for any number of lines.

    python tools/check_shown_output.py                 # every shown command (~4 min on 2 cores, the demo included)
    python tools/check_shown_output.py "taer" "info"   # only commands containing one of these strings

Commands run in /tmp (the pages write their outputs under /tmp/...; those folders and files are removed first). Exit 1 if
any command differs or fails. Not part of the test suite: it takes minutes and needs the bundled model only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
TIMES = re.compile(r"\d+(\.\d+)?s\b|\d+% of the prefill")


def shown_commands(text: str):
    """(command, shown output lines) for every `$ mumoe` line of every fenced block."""
    for block in FENCE.findall(text):
        lines = block.split("\n")
        for i, line in enumerate(lines):
            if not line.startswith("$ mumoe"):
                continue
            j = i + 1
            while j < len(lines) and not lines[j].startswith("$ "):
                j += 1
            yield line[2:].split("  #")[0].strip(), [x for x in lines[i + 1:j] if x.strip()]


def masked(line: str) -> str:
    return TIMES.sub("T", line.rstrip())


def differences(shown: list[str], got: list[str]) -> list[str]:
    """Shown lines that the output does not have, in order; `...` skips ahead to the next shown line."""
    out, g, skipping = [], 0, False
    for s in shown:
        if s.strip() == "...":
            skipping = True
            continue
        if skipping:
            while g < len(got) and masked(got[g]) != masked(s):
                g += 1
            skipping = False
        if g < len(got) and masked(got[g]) == masked(s):
            g += 1
        else:
            out.append(f"  shown: {s}\n  got:   {got[g] if g < len(got) else '<end of output>'}")
            g += 1
    return out


def main(only: list[str]) -> int:
    failed = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cmd, shown in shown_commands(page.read_text()):
            if only and not any(o in cmd for o in only):
                continue
            out = re.search(r"--out (/tmp/\S+)", cmd)
            if out:
                target = Path(out.group(1))
                if target.is_file():  # a file output (`train-skipper --out F.safetensors`)
                    target.unlink()
                else:
                    shutil.rmtree(target, ignore_errors=True)
            run = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd="/tmp")
            diff = differences(shown, [x for x in run.stdout.split("\n") if x.strip()])
            ok = not diff and run.returncode == 0
            failed += not ok
            print(f"{'ok  ' if ok else 'DIFF'} {page.relative_to(ROOT)}: {cmd}" + ("" if ok else f" (exit {run.returncode})"))
            for d in diff[:8]:
                print(d)
            if run.returncode:
                print(run.stderr[-600:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
