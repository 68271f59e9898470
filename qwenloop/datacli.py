"""``qwenloop data``: what training would make of a data file, without loading a model or touching a GPU.

    qwenloop data FILE [FILE ...] [--config my.yaml] [--key value ...] [--sample N] [--max-errors N] [--json]
    qwenloop data --config my.yaml          # the config's train_file (and eval_file)

The same checks as training (``records.py``, ``formats.py``: every bad record reported at once), record
statistics (formats, turns, leading assistant turns, tool calls), and, when a tokenizer is known (the
config's ``model``, or ``--model DIR``), the token statistics training would see (total and target tokens,
a length histogram, what ``max_seq_len`` cuts or drops) and one rendered sample with the trained tokens
marked. Every number comes from the functions ``build_dataset`` uses, so it is what a run logs.

Exit code 0 when training would accept every file, 2 (with the run's own ``error:`` line) when it would not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from .errors import UserError

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: rare in training data, unlike [ ] or < >
BAR_WIDTH = 40


def main(argv: list[str]) -> int:
    own, overrides = _split(argv)
    parser = argparse.ArgumentParser(prog="qwenloop data", allow_abbrev=False,
                                     description="check a data file and show what training would make of it")
    parser.add_argument("files", nargs="*", help="data files (default: the config's train_file and eval_file)")
    parser.add_argument("--config", help="training config: its model's tokenizer and chat template, format, max_seq_len, ...")
    parser.add_argument("--sample", type=int, default=None, help="record (0-based) to render with its trained tokens marked")
    parser.add_argument("--max-errors", type=int, default=20, help="bad records to list (0: all)")
    parser.add_argument("--json", action="store_true", help="print the statistics as one JSON object per file")
    args = parser.parse_args(own)
    cfg = _config(args.config, overrides)
    files = args.files or [f for f in (cfg.train_file, cfg.eval_file) if f]
    if not files:
        raise UserError("qwenloop data: name a data file, or a --config with a train_file")
    tokenizer, no_tokens = _tokenizer(cfg)
    refusals = []
    for path in files:
        summary, sample, report, refusal = inspect(path, tokenizer, cfg, args.sample)
        if args.json:
            listed = report.problems if args.max_errors <= 0 else report.problems[: args.max_errors]
            print(json.dumps({**summary, "problems": [list(p) for p in listed]}))
        else:
            _print(summary, report.lines(args.max_errors) if report.problems else [], sample, no_tokens)
        if refusal:
            refusals.append(refusal)
    if refusals:
        if len(refusals) > 1:
            print("\n".join(f"error: {e}" for e in refusals[:-1]), file=sys.stderr)
        raise refusals[-1]
    return 0


OWN_OPTIONS = {"--config": 1, "--sample": 1, "--max-errors": 1, "--json": 0, "-h": 0, "--help": 0}  # option: values


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """This command's own arguments, and the ``--key value`` config overrides (``qwenloop train``'s). Split
    here: argparse would take an unknown option's value for a file name."""
    own, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in OWN_OPTIONS or not arg.startswith("--"):
            n = 1 + (OWN_OPTIONS.get(name, 0) if "=" not in arg else 0)
            own += argv[i : i + n]
        else:
            n = 1 if "=" in arg else 2
            overrides += argv[i : i + n]
        i += n
    return own, overrides


def _config(path: str | None, overrides: list[str]):
    from .config import TrainConfig

    if path:  # validated by type only: a config with a missing model or output_dir still describes the data
        return TrainConfig.from_yaml(path, overrides, validate=False)
    return TrainConfig.from_dict({}, overrides=overrides, source="command line", validate=False)


def _tokenizer(cfg):
    """The run's tokenizer (with its chat template), or None and why not: the record checks need none, so a
    model that cannot be read here (a hub id without a network) costs the token statistics only."""
    if not cfg.model:
        return None, "need the model's tokenizer and chat template: pass --config my.yaml (or --model DIR)"
    from .model import load_tokenizer

    try:
        return load_tokenizer(cfg), ""
    except UserError as e:
        return None, f"not counted ({e})"


def inspect(path: str, tokenizer, cfg, sample: int | None = None):
    """(summary dict, sample text or None, DataReport, the UserError training would stop with or None)."""
    from collections import Counter

    from .data import judge, located, select_kept, tokenize_records
    from .datareport import DataReport
    from .records import check_records, load_raw

    raw = load_raw(path)
    checked = check_records(raw, cfg.format)
    report = DataReport(path, len(raw.dataset), located(raw, checked.problems))
    usable, kept, tokens, text = checked.good, None, None, None
    if tokenizer is not None:
        tokenized = tokenize_records(raw, checked.good, tokenizer, cfg)
        report.problems = located(raw, checked.problems + tokenized.problems)
        usable = sorted(set(checked.good) - {i for i, _ in tokenized.problems})
        kept = select_kept(tokenized.dataset, cfg.truncation)
        tokens = _token_stats(tokenized.dataset, kept, cfg)
        text = _sample(raw, checked.good, tokenized.dataset, kept, tokenizer, sample)
    stats = checked.stats.to_dict()  # columns as lists: indexing a datasets column reads arrow per element
    summary = {
        "file": path,
        "kind": raw.kind,
        "records": len(raw.dataset),
        "bad_records": len(report.problems),
        "formats": dict(Counter(stats["format"][i] for i in usable)),
        "turns": _spread([stats["turns"][i] for i in usable]),
        **{key: sum(stats[column][i] for i in usable) for key, column in (
            ("leading_assistant_turns", "leading_assistant"), ("records_with_tools", "with_tools"),
            ("tool_calls", "tool_calls"), ("tool_results", "tool_results"))},
    }
    if tokens is not None:
        summary["tokens"] = tokens
    policy = getattr(cfg, "bad_records", "error")
    try:
        judge(report, kept, policy, cfg.max_seq_len, log=False)
        refusal = None
    except UserError as e:
        refusal = e
    summary["accepted"] = refusal is None
    summary["bad_records_policy"] = policy
    return summary, text, report, refusal


def _spread(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731 - nearest rank
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1)}


def _token_stats(tokenized, kept, cfg) -> dict:
    """What ``build_dataset`` keeps (``TokenizedData.lengths`` / ``target_tokens``) and what it cut or dropped."""
    columns = tokenized.select_columns(["length", "num_targets", "full_length", "problem"]).to_dict()
    lengths, targets, full, problems = (columns[k] for k in ("length", "num_targets", "full_length", "problem"))
    full_good = [n for n, p in zip(full, problems) if not p]
    return {
        "examples": len(kept.rows),
        "tokens": sum(lengths[i] for i in kept.rows),
        "target_tokens": sum(targets[i] for i in kept.rows),
        "length_before_truncation": _spread(full_good),
        "max_seq_len": cfg.max_seq_len,
        "truncation": cfg.truncation,
        "over_max_seq_len": kept.too_long,
        "truncated": kept.truncated,
        "dropped": kept.dropped,
        "histogram": _histogram(full_good, cfg.max_seq_len),
    }


def _histogram(lengths: list[int], max_seq_len: int) -> list[list]:
    """[low, high, count] bins of tokens per record: powers of two up to ``max_seq_len``, then one bin over it
    (high null): the shape that matters is how much lies near and beyond the limit."""
    edges, edge = [], 64
    while edge < max_seq_len:
        edges.append(edge)
        edge *= 2
    edges.append(max_seq_len)
    bins, low = [], 1
    for high in edges:
        bins.append([low, high, sum(low <= n <= high for n in lengths)])
        low = high + 1
    bins.append([low, None, sum(n > max_seq_len for n in lengths)])
    return bins


def _sample(raw, good, tokenized, kept, tokenizer, index: int | None) -> str | None:
    """One record rendered as the model sees it, every run of trained tokens between ⟦ and ⟧."""
    from .data import IGNORE_INDEX

    if index is None:
        if not kept.rows:
            return None
        row = kept.rows[0]
    else:
        if not 0 <= index < len(raw.dataset):
            raise UserError(f"--sample {index}: the file has records 0 to {len(raw.dataset) - 1}")
        row = good.index(index) if index in good else None
        if row is None or tokenized[row]["problem"]:
            return f"sample: record {index} ({raw.locations()[index]}) cannot be used: the report says why"
    example = tokenized[row]
    where = raw.locations()[good[row]]
    parts, run, trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_target = label != IGNORE_INDEX
        if run and is_target != trained:
            parts.append(_segment(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = is_target
    if run:
        parts.append(_segment(tokenizer, run, trained))
    cut = f", cut to max_seq_len={len(example['input_ids'])}" if example["too_long"] else ""
    head = (f"sample: {where} ({example['full_length']} tokens{cut}, {example['num_targets']} trained on; "
            f"{OPEN}...{CLOSE} marks them)")
    return head + "\n" + "".join(parts)


def _segment(tokenizer, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def _print(summary: dict, report_lines: list[str], sample: str | None, no_tokens: str) -> None:
    if sys.stdout.encoding and sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(errors="backslashreplace")  # the sample's markers, and the data's own text
    out = [f"{summary['file']} ({summary['kind']}): {summary['records']:,} records, {summary['bad_records']:,} bad"]
    formats = ", ".join(f"{name} {n:,}" for name, n in sorted(summary["formats"].items()))
    out.append(f"  formats (usable records): {formats or 'none'}")
    if summary["turns"]:
        t = summary["turns"]
        out.append(f"  turns per record: min {t['min']}, median {t['p50']}, max {t['max']} (mean {t['mean']})")
    out.append(f"  leading assistant turns (context, not trained): {summary['leading_assistant_turns']:,}")
    out.append(f"  tool calling: {summary['records_with_tools']:,} records with tools, {summary['tool_calls']:,} tool calls, "
               f"{summary['tool_results']:,} tool results")
    tokens = summary.get("tokens")
    if tokens is None:
        out.append(f"  tokens: {no_tokens}")
    else:
        out += _token_lines(tokens)
    out += report_lines
    if sample:
        out += ["", sample]
    verdict = "accepted" if summary["accepted"] else "refused (see the error below)"
    out.append(f"training with bad_records: {summary['bad_records_policy']}: {verdict}")
    print("\n".join(out) + "\n")


def _token_lines(t: dict) -> list[str]:
    share = 100 * t["target_tokens"] / max(1, t["tokens"])
    over = t["over_max_seq_len"]
    out = [
        f"  examples trained on: {t['examples']:,} ({t['tokens']:,} tokens, {t['target_tokens']:,} of them targets: {share:.1f}%)",
        f"  over max_seq_len={t['max_seq_len']}: {over:,} of {t['examples'] + t['dropped']:,} "
        f"({100 * over / max(1, t['examples'] + t['dropped']):.1f}%): {t['truncated']:,} cut, {t['dropped']:,} left out "
        f"(truncation: {t['truncation']}; a cut that leaves no target leaves the record out)",
    ]
    spread = t["length_before_truncation"]
    if spread:
        out.append(f"  tokens per record before truncation: min {spread['min']:,}, p50 {spread['p50']:,}, "
                   f"p90 {spread['p90']:,}, p99 {spread['p99']:,}, max {spread['max']:,}")
    peak = max([n for _, _, n in t["histogram"]] + [1])
    for low, high, n in t["histogram"]:
        label = f"{low:>7,} - {high:<7,}" if high is not None else f"{'> ' + format(low - 1, ','):>17}"
        out.append(f"    {label} {'#' * round(BAR_WIDTH * n / peak):<{BAR_WIDTH}} {n:,}")
    return out
