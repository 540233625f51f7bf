"""Longer fault-injection runs than CI's: SIGKILL `dpa upgrade --force` and `dpa export --force` N times each at
seeded random moments and check, after every kill, that the previous state is byte for byte intact (or the
new one complete and matching its manifest), and that the next successful run leaves no temporaries.

    python scripts/fault_trials.py --trials 50 [--seed 7] [--subprocess] [--keep DIR]

`--subprocess` runs every command as a fresh `python -m dpa_cli` (slower: interpreter start-up each time);
by default children are forked from a server that has dpa imported. Training kills: tests/test_faults.py.
Prints one JSON line per command with the counts; exit code 1 if any trial lost anything.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def trials(kit, command: list, ws: Path, part: Path, n: int, rng: random.Random, vary) -> dict:
    """`n` kills of `command` (plus `vary(i)` arguments); `part` is what the command may replace."""
    from dpa_cli.checksums import verify_path
    from tests.fault_kit import leftovers, tree_hash

    first = kit.run(command)
    assert first.code == 0, f"the first run failed: see {kit.log}"
    kills = replaced = 0
    lost = []
    outside = (part.name, f".{part.name}.dpa-") if part != ws else None
    rest = tree_hash(ws, skip=outside) if outside else None
    for i in range(1, n + 1):
        before = tree_hash(part)
        outcome = kit.run([*command, "--force", *vary(i)], kill_after=rng.uniform(0.02, 1.1) * first.seconds)
        kills += outcome.killed
        if outside and tree_hash(ws, skip=outside) != rest:
            lost.append(f"trial {i}: the workspace changed")
        if tree_hash(part) != before:
            replaced += 1
            if not verify_path(part).clean:
                lost.append(f"trial {i}: {part} is neither the old state nor a complete new one")
    assert kit.run([*command, "--force"]).code == 0
    if leftovers(ws):
        lost.append(f"temporaries after the next successful run: {leftovers(ws)}")
    return {"kills": kills, "finished_before_kill": n - kills, "new_state_after_kill": replaced, "lost": lost}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per command")
    parser.add_argument("--seed", type=int, default=20260515)
    parser.add_argument("--subprocess", action="store_true", help="a fresh `python -m dpa_cli` per run")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()

    from tests.factories import build
    from tests.fault_kit import Runner

    root = Path(args.keep or tempfile.mkdtemp(prefix="dpa-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    target, lm = build("llava_next", root / "target"), build("causal_lm_qwen3", root / "lm")
    kit = Runner(root / "children.log", fresh_interpreter=args.subprocess)
    kit.run(["--version"])
    rng, ws, failed = random.Random(args.seed), root / "ws", False
    upgrade = ["upgrade", target, "--perceiver", f"vit=target,lm={lm}", "-o", ws, "--no-verify-load"]
    export = ["export", "-w", ws, "--no-verify"]
    for name, command, part, vary in (
        ("upgrade", upgrade, ws, lambda i: ["--seed", i]),
        ("export", export, ws / "export", lambda i: ["--dtype", "bf16" if i % 2 else "fp32"]),
    ):
        result = trials(kit, command, ws, part, args.trials, rng, vary)
        print(json.dumps({"command": name, "trials": args.trials, **result}), flush=True)
        failed |= bool(result["lost"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
