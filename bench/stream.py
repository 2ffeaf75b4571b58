"""Peak memory and throughput of the streamed CLI commands on a synthetic C=1000 table.

    python bench/stream.py [--rows 1000000] [--classes 1000] [--noise-classes 100] [--queries 2]
                           [--compare-rows 100000] [--repeats 2] [--hidden 256] [--dir /tmp/logitguard-stream]
                           [--kill-at 12] [--only inspect,detect,...] [--skip-full] [--skip-compare] [--keep]

1. Synthetic tables under `--dir` (written batch by batch; one split "test", attacks clean and pgd, half
   the rows each, labelled): the main table, `--rows` x `--classes` (1M x 1000: 4 GB of logits), and a
   noise table, `--rows` x `--noise-classes` with K=`--queries` noise queries, for the detectors that read
   them (odds, learned-noisy): at C=1000 the noise queries alone would be K x 4 GB more on disk and make
   every pass K+1 times longer, while the streamed memory does not grow with C or K (batches hold ~8 MiB).
   Logits are Gaussian with a bump at the label; attacked rows move the bump to another class (most
   attacks succeed); noise queries of attacked rows lean back towards the label (what the odds test sees).
2. Every command runs as its own process (`logitguard …` through `python -c`). Printed: its peak RSS (the child's
   ru_maxrss from wait4) and rows/s (table rows / wall-clock seconds from process start to exit, imports
   included). A watchdog kills a process whose RSS passes `--kill-at` GiB. The corrector has random weights
   (`--hidden` wide): costs do not depend on training.
3. At `--compare-rows` (tables of that size, made the same way), each command beside its in-memory path:
   the library on a loaded table, as the CLI ran before streaming (`python bench/stream.py in-memory …`);
   the best of `--repeats` runs of each.

Targets (issue 12): every command <= 2 GiB peak RSS at 1M x 1000; streamed rows/s within 20% of the
in-memory path at 100k rows. Figures only: nothing is asserted. Tables and outputs are deleted at the end
unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

GIB = 1 << 30
CHUNK = 8192  # samples per generated batch


# ---------------------------------------------------------------------------------------------
# Synthetic tables


def synthetic_batches(samples: int, classes: int, queries: int, seed: int):
    """LogitTable batches: for each chunk of samples, its clean rows then its pgd rows."""
    from logitguard import LogitTable

    rng = np.random.default_rng(seed)
    names = [f"class-{i}" for i in range(classes)]
    for start in range(0, samples, CHUNK):
        n = min(CHUNK, samples - start)
        ids = np.arange(start, start + n)
        labels = rng.integers(0, classes, n)
        target = (labels + rng.integers(1, classes, n)) % classes
        rows = np.arange(n)
        clean = rng.standard_normal((n, classes), dtype=np.float32)
        clean[rows, labels] += 5.0
        attacked = clean + 0.3 * rng.standard_normal((n, classes), dtype=np.float32)
        attacked[rows, labels] -= 4.0
        attacked[rows, target] += 5.0
        for attack, logits in (("clean", clean), ("pgd", attacked)):
            noisy = None
            if queries:
                noisy = logits[:, None, :] + 0.5 * rng.standard_normal((n, queries, classes), dtype=np.float32)
                if attack == "pgd":
                    noisy[rows, :, labels] += 1.5
            yield LogitTable.from_arrays(logits=logits, noisy_logits=noisy, sample_id=ids, split="test", attack=attack,
                                         label=labels, metadata={"class_names": names, "dataset": {"name": "synthetic"}})


def write_synthetic(path: Path, rows: int, classes: int, queries: int, seed: int) -> None:
    from logitguard.tables import write_batches

    if path.exists():
        print(f"  using {path}")
        return
    start = time.perf_counter()
    write_batches(synthetic_batches(rows // 2, classes, queries, seed), path, partition_by=("split", "attack"))
    size = sum(f.stat().st_size for f in path.rglob("*.parquet"))
    print(f"  wrote {path}: {rows:,} rows x {classes} classes, K={queries}, {size / GIB:.2f} GiB on disk "
          f"({time.perf_counter() - start:.0f} s)")


def write_artifacts(where: Path, classes: int, hidden: int) -> Path:
    """A random-weight corrector (what it costs does not depend on its training)."""
    from _common import untrained_corrector

    path = where / f"corrector-c{classes}.npz"
    if not path.exists():
        corrector = untrained_corrector(classes, hidden)
        corrector.history_, corrector.best_epoch_ = [], 0
        corrector.save(path)
    return path


def write_guard(detector: Path, out: Path, classes: int) -> None:
    from logitguard.defenses.gated import GatedDefense
    from logitguard.defenses.detectors import load_detector
    from logitguard.defenses.guard import Guard

    Guard(GatedDefense(load_detector(detector), None, on_flag="reject"),
          class_names=[f"class-{i}" for i in range(classes)]).save(out, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Running one command


def run(argv: list[str], kill_at: float, log: Path) -> dict:
    """Run `argv` (a Python process); its wall seconds, peak RSS (GiB) and whether it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    killed = []

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.returncode is None:
            try:
                rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
            except (OSError, StopIteration, ValueError):
                return
            if rss * 1024 > kill_at * GIB:
                killed.append(rss * 1024 / GIB)
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    watcher.join()
    ok = proc.returncode == 0
    if not ok and not killed:
        print(f"    FAILED (exit {proc.returncode}); last lines of {log}:")
        print("      " + "\n      ".join(log.read_text(errors="replace").splitlines()[-5:]))
    return {"seconds": seconds, "rss": usage.ru_maxrss * 1024 / GIB, "ok": ok,
            "killed": killed[0] if killed else None}


def commands(tables: dict[str, Path], files: dict[str, Path], out: Path) -> list[tuple[str, str, list[str]]]:
    """(name, table key, arguments after the program) for every command; fit-detector before its users."""
    t, n = str(tables["main"]), str(tables["noise"])
    d = {k: str(v) for k, v in files.items()}
    fit = lambda table, kind: ["fit-detector", table, "--kind", kind, "--split", "test",  # noqa: E731
                               "--out", d[kind], "--force", "--json"]
    return [
        ("inspect", "main", ["inspect", t, "--json"]),
        ("fit-detector msp", "main", fit(t, "msp")),
        ("fit-detector odds-single", "main", fit(t, "odds-single")),
        ("fit-detector learned", "main", fit(t, "learned")),
        ("detect (msp)", "main", ["detect", t, "--detector", d["msp"], "--json"]),
        ("detect (learned)", "main", ["detect", t, "--detector", d["learned"], "--json"]),
        ("train-corrector --stream", "main", ["train-corrector", t, "--attacks", "pgd", "--split", "test", "--stream",
                                              "--epochs", "1", "--out", str(out / "trained.npz"), "--force",
                                              "--json"]),
        ("correct", "main", ["correct", t, "--corrector", d["corrector"], "--out", str(out / "corrected"),
                             "--force", "--json"]),
        ("evaluate", "main", ["evaluate", t, "--corrector", d["corrector"], "--json"]),
        ("explain", "main", ["explain", t, "--corrector", d["corrector"], "--json"]),
        ("defend (learned + corrector)", "main", ["defend", t, "--detector", d["learned"], "--corrector",
                                                  d["corrector"], "--out", str(out / "defended"), "--force", "--json"]),
        ("guard apply (learned, reject)", "main", ["guard", "apply", t, "--guard", d["guard"], "--out",
                                                   str(out / "guarded"), "--force", "--json"]),
        ("fit-detector odds", "noise", fit(n, "odds")),
        ("fit-detector learned-noisy", "noise", fit(n, "learned-noisy")),
        ("detect (odds)", "noise", ["detect", n, "--detector", d["odds"], "--json"]),
        ("defend (odds, reject)", "noise", ["defend", n, "--detector", d["odds"], "--on-flag", "reject", "--out",
                                            str(out / "defended-noise"), "--force", "--json"]),
    ]


def run_all(label: str, tables: dict[str, Path], files: dict[str, Path], rows: int, args, *,
            in_memory: bool = False, wanted=None, after=None) -> dict[str, dict]:
    out = args.dir / "out"
    out.mkdir(exist_ok=True)
    results = {}
    for name, table, argv in commands(tables, files, out):
        if wanted and not any(w in name for w in wanted):
            continue
        if in_memory:
            argv = ["bench/stream.py", "in-memory", *argv]
            if argv[2] == "fit-detector":  # keep the streamed fit's file for the commands that use it
                argv[argv.index("--out") + 1] += ".in-memory.npz"
        else:
            argv = ["-c", "from logitguard.cli import main; main()", *argv]
        best = None
        for _ in range(args.repeats if rows == args.compare_rows else 1):
            result = run(argv, args.kill_at, args.dir / "last.log")
            if best is None or (result["ok"] and result["seconds"] < best["seconds"]):
                best = result
        best["rows"] = rows
        results[name] = best
        state = "ok" if best["ok"] else ("killed at %.1f GiB" % best["killed"] if best["killed"] else "failed")
        print(f"  {label:9s} {name:32s} {best['rss']:6.2f} GiB  {rows / best['seconds']:10,.0f} rows/s  "
              f"({best['seconds']:.1f} s, {state})", flush=True)
        if after:
            after(name)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(exist_ok=True)
    return results


# ---------------------------------------------------------------------------------------------
# The in-memory paths (the CLI before streaming: load the table, call the library, write)


def in_memory(argv: list[str]) -> None:
    """`bench/stream.py in-memory COMMAND TABLE [--option value | --flag]…`, in memory."""
    from logitguard import read_table, write_table
    from logitguard.tables import CLEAN, table_columns

    words = argv[1:] if argv[0] != "guard" else argv[2:]
    command = argv[0] if argv[0] != "guard" else "guard apply"
    table, options = words[0], {}
    rest = words[1:]
    while rest:
        key = rest.pop(0)[2:]
        options[key] = rest.pop(0) if rest and not rest[0].startswith("--") else True
    report: object = None

    def defended_report(defense, defended, data, out):
        from logitguard.evaluation.evaluate import evaluate

        partition = None if out.endswith(".parquet") else ("split", "attack")
        written = write_table(defended, out, partition_by=partition, basename="defended", overwrite=True)
        results = None
        if data.has_labels and CLEAN in data.attacks and len(data.attacks) > 1:
            results = evaluate(data.select(split="test") if "test" in data.splits else data, {"gated": defense})
        flagged = {a: float(defended.column("flagged")[data.attack == a].mean()) for a in data.attacks}
        return {"written": [str(p) for p in written], "flagged_rate": flagged,
                "evaluation": None if results is None else results.to_dict(orient="records")}

    if command == "inspect":
        from logitguard.report.summary import summarize

        report = summarize(read_table(table))
    elif command == "fit-detector":
        from logitguard.defenses.detectors import make_detector

        detector = make_detector(options["kind"]).fit_table(read_table(table, split=options["split"]))
        detector.save(options["out"], overwrite=True)
        report = {"threshold": detector.threshold_}
    elif command == "detect":
        from logitguard.defenses.detectors import load_detector
        from logitguard.evaluation.evaluate import detection_table

        detector = load_detector(options["detector"])
        data = read_table(table, split="test")
        flagged = detector.flag_table(data)
        report = {"flagged_rate": {a: float(flagged[data.attack == a].mean()) for a in data.attacks},
                  "metrics": detection_table(data, {detector.kind: detector}).to_dict(orient="records")}
    elif command in ("correct", "evaluate", "explain"):
        from logitguard.defenses.corrector import LogitCorrector

        corrector = LogitCorrector.load(options["corrector"])
        if command == "correct":
            from logitguard.report.summary import summarize

            source = read_table(table, columns=[c for c in ("linf", "l2") if c in table_columns(table)])
            corrected = corrector.correct_table(source)
            write_table(corrected, options["out"], partition_by=("split", "attack"), basename="corrected",
                        overwrite=True)
            report = summarize(corrected)
        elif command == "evaluate":
            from logitguard.evaluation.evaluate import evaluate

            report = evaluate(read_table(table, split="test", columns=[]), {"corrector": corrector}).to_dict("records")
        else:
            from logitguard import explain as ex

            data = read_table(table, split="test", columns=[])
            freqs = ex.supporting_frequencies(corrector, data, None)
            report = {"bhattacharyya": ex.bhattacharyya_matrix(freqs).to_dict(),
                      "ablation": [ex.ablation(corrector, data, a) for a in freqs.columns]}
    elif command == "defend":
        from logitguard.defenses.gated import GatedDefense, load_corrector
        from logitguard.defenses.detectors import load_detector

        corrector = load_corrector(options["corrector"]) if "corrector" in options else None
        defense = GatedDefense(load_detector(options["detector"]), corrector,
                               on_flag=options.get("on-flag", "correct"))
        data = read_table(table)
        report = defended_report(defense, defense.defend_table(data), data, options["out"])
    elif command == "guard apply":
        from logitguard.defenses.guard import Guard

        guard = Guard.load(options["guard"])
        data = read_table(table)
        report = defended_report(guard.defense, guard.defend_table(data), data, options["out"])
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(report, default=str)[:2000])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "in-memory":
        in_memory(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--noise-classes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--compare-rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2, help="Runs per command at --compare-rows (best counts).")
    parser.add_argument("--hidden", type=int, default=256, help="Hidden width of the random-weight corrector.")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/logitguard-stream"))
    parser.add_argument("--kill-at", type=float, default=12.0, help="Kill a command whose RSS passes this (GiB).")
    parser.add_argument("--only", default=None, help="Comma-separated parts of command names to run.")
    parser.add_argument("--skip-full", action="store_true", help="Only the comparison at --compare-rows.")
    parser.add_argument("--skip-compare", action="store_true", help="Only the streamed runs at --rows.")
    parser.add_argument("--keep", action="store_true", help="Keep the tables under --dir.")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else None
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; tables under {args.dir}")
    sizes = ([] if args.skip_full else [args.rows]) + ([] if args.skip_compare else [args.compare_rows])
    summary: dict[int, dict[str, dict]] = {}
    try:
        for rows in dict.fromkeys(sizes):
            tag = f"{rows // 1000}k"
            tables = {"main": args.dir / f"main-{tag}-c{args.classes}",
                      "noise": args.dir / f"noise-{tag}-c{args.noise_classes}-k{args.queries}"}
            print(f"\n{rows:,} rows")
            write_synthetic(tables["main"], rows, args.classes, 0, seed=rows)
            write_synthetic(tables["noise"], rows, args.noise_classes, args.queries, seed=rows + 1)
            files = {"corrector": write_artifacts(args.dir, args.classes, args.hidden), "guard": args.dir / f"guard-{tag}.npz"}
            files |= {kind: args.dir / f"{kind}-{tag}.npz"
                      for kind in ("msp", "odds-single", "learned", "odds", "learned-noisy")}

            def after(name: str) -> None:
                if name == "fit-detector learned" and files["learned"].exists():
                    write_guard(files["learned"], files["guard"], args.classes)

            streamed = run_all("streamed", tables, files, rows, args, wanted=wanted, after=after)
            summary[rows] = {"streamed": streamed}
            if rows == args.compare_rows:
                summary[rows]["in-memory"] = run_all("in-memory", tables, files, rows, args, in_memory=True,
                                                     wanted=wanted)
    finally:
        if not args.keep:
            for path in args.dir.glob("*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    print("\nsummary")
    for rows, parts in summary.items():
        streamed, memory = parts["streamed"], parts.get("in-memory")
        print(f"\n{rows:,} rows" + ("" if memory is None else "   (streamed vs in-memory)"))
        for name, s in streamed.items():
            line = f"  {name:32s} {s['rss']:6.2f} GiB {s['rows'] / s['seconds']:10,.0f} rows/s"
            if memory and name in memory:
                m = memory[name]
                line += (f"  | in memory {m['rss']:6.2f} GiB {m['rows'] / m['seconds']:10,.0f} rows/s"
                         f"  | speed {m['seconds'] / s['seconds']:5.2f}x")
            print(line + ("" if s["ok"] else "  (did not finish)"))


if __name__ == "__main__":
    main()
