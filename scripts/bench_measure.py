#!/usr/bin/env python3
"""Measuring side of scripts/bench.sh: watches a running worker through its /metrics endpoint and
/proc, writes the SQL of the ceiling run, and prints the final table (and its JSON)."""

import argparse
import json
import os
import sys
import time
import urllib.request


def scrape(addr):
    """The worker's metrics as {(name, labels-tuple): value}."""
    body = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = tuple(sorted(p.split("=", 1) for p in labels.rstrip("}").split('",') if p))
        out[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def total(metrics, name, **want):
    return sum(v for (n, labels), v in metrics.items()
               if n == name and all(dict(labels).get(k) == w for k, w in want.items()))


def quantile(metrics, q, histogram="booking_worker_processing_seconds"):
    """A quantile of a latency histogram over every event type, in ms, interpolated within its
    bucket: consume to durable by default, or booking_worker_end_to_end_seconds (the record's Kafka
    timestamp to durable)."""
    buckets = {}
    for (name, labels), v in metrics.items():
        if name == histogram + "_bucket":
            le = dict(labels)["le"]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + v
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return lower * 1000
            share = (rank - below) / max(buckets[b] - below, 1e-9)
            return (lower + (b - lower) * share) * 1000
        lower, below = b, buckets[b]
    return lower * 1000


def proc_figures(pid):
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    peak_kib = int(status["VmHWM"].split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return peak_kib / 1024, cpu


def rss_now_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024


def idle(pid, addr, seconds):
    """Waits until the worker is ready (its group has assigned it the partitions), then measures
    its CPU and resident memory over `seconds` with no traffic."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://{addr}/readyz", timeout=5).status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"bench: the worker at {addr} was not ready within 120 s")
        time.sleep(0.2)
    time.sleep(2)
    print(f"[bench] ready; measuring {seconds} s idle", file=sys.stderr)
    _, cpu_before = proc_figures(pid)
    time.sleep(seconds)
    _, cpu_after = proc_figures(pid)
    return {
        "idle_seconds": seconds,
        "idle_cpu_percent": round((cpu_after - cpu_before) / seconds * 100, 2),
        "idle_rss_mib": round(rss_now_mib(pid), 1),
    }


def watch(pid, addr, until):
    started = time.monotonic()
    first = None
    last_count, last_change = -1, time.monotonic()
    # Progress: one line updated in place on a terminal, a line every 10 s in a log.
    tty, last_report = sys.stderr.isatty(), time.monotonic()
    depths = []
    while True:
        time.sleep(0.05)
        try:
            m = scrape(addr)
        except OSError:
            if time.monotonic() - started > 120:
                sys.exit(f"bench: no metrics from the worker at {addr}")
            continue
        count = total(m, "booking_worker_events_total")
        if 0 < count < until:
            depths.append(total(m, "booking_worker_channel_depth"))
        now = time.monotonic()
        if count > 0 and first is None:
            first = now
        if count != last_count:
            last_count, last_change = count, now
            if tty:
                print(f"[bench] {int(count)} / {until} records", file=sys.stderr, end="\r")
            elif now - last_report >= 10:
                last_report = now
                print(f"[bench] {int(count)} / {until} records", file=sys.stderr)
        if count >= until:
            break
        if now - last_change > 120:
            sys.exit(f"bench: no progress for 120 s at {int(count)} of {until} records")
    done = time.monotonic()
    rss, cpu = proc_figures(pid)
    print(file=sys.stderr)
    return {
        "records": int(count),
        "seconds": round(done - first, 3),
        "startup_seconds": round(first - started, 3),
        "p50_ms": quantile(m, 0.50),
        "p99_ms": quantile(m, 0.99),
        "e2e_p50_ms": quantile(m, 0.50, "booking_worker_end_to_end_seconds"),
        "e2e_p99_ms": quantile(m, 0.99, "booking_worker_end_to_end_seconds"),
        "peak_rss_mib": round(rss, 1),
        "cpu_seconds": round(cpu, 2),
        "transactions": int(total(m, "booking_worker_db_transactions_total", result="committed")),
        "parked": int(total(m, "booking_worker_events_total", end="parked")),
        "mean_channel_depth": round(sum(depths) / len(depths)) if depths else None,
    }


def ceiling_sql(ledger_path, batch):
    ledger = json.load(open(ledger_path))
    rows = list(ledger["bookings"].items())
    out = []
    for i in range(0, len(rows), batch):
        values = ",\n".join(
            "('{}','{}','{}','{}')".format(
                bid.replace("'", "''"), b["user"].replace("'", "''"), b["room"].replace("'", "''"), b["status"])
            for bid, b in rows[i:i + batch])
        out.append(
            "INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id, status,"
            " external_id, created_at, updated_at)\n"
            "SELECT u.id, r.id, 2, DATE '2026-03-01', DATE '2026-03-04', 'pay_' || v.b, v.s, v.b, now(), now()\n"
            f"FROM (VALUES {values}) AS v(b, u, r, s)\n"
            "JOIN users u ON u.username = v.u JOIN rooms r ON r.internal_id = v.r\n"
            "ON CONFLICT (external_id) DO NOTHING;")
    return "\n".join(out)


def copy_csv(ledger_path, ids_path):
    """The ceiling's rows as CSV for COPY, user and room resolved through `ids_path` (lines of
    `kind|name|id`, from the database)."""
    ids = {}
    for line in open(ids_path):
        kind, name, value = line.rstrip("\n").split("|")
        ids[(kind, name)] = value
    out = []
    for bid, b in json.load(open(ledger_path))["bookings"].items():
        user, room = ids[("user", b["user"])], ids[("room", b["room"])]
        quoted = '"' + bid.replace('"', '""') + '"'
        out.append(f"{user},{room},2,2026-03-01,2026-03-04,\"pay_{bid}\",{b['status']},{quoted}")
    return "\n".join(out)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def report(batched, single, ceiling, copy, json_out):
    for r in (batched, single, ceiling, copy):
        r["events_per_second"] = r["records"] / r["seconds"] if r["seconds"] else None
    b, s, c = batched["events_per_second"], single["events_per_second"], ceiling["events_per_second"]
    k = copy["events_per_second"]
    table = {
        "batched": batched,
        "batching_off": single,
        "sql_ceiling": ceiling,
        "copy_limit": copy,
        "ratios": {
            "batched_over_batching_off": round(b / s, 1) if b and s else None,
            "batched_over_ceiling": round(b / c, 3) if b and c else None,
            "batched_over_copy": round(b / k, 3) if b and k else None,
        },
    }
    print()
    print(f"{'run':<16}{'records':>10}{'seconds':>10}{'events/s':>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'peak RSS MiB':>14}{'CPU s':>8}")
    for name, r in (("batched", batched), ("batching off", single), ("SQL ceiling", ceiling), ("COPY limit", copy)):
        print(f"{name:<16}{r['records']:>10,}{r['seconds']:>10.2f}{fmt(r['events_per_second'], 0):>12}"
              f"{fmt(r.get('p50_ms')):>9}{fmt(r.get('p99_ms')):>9}{fmt(r.get('peak_rss_mib')):>14}"
              f"{fmt(r.get('cpu_seconds')):>8}")
    ratios = table["ratios"]
    print(f"\nbatched / batching off: {ratios['batched_over_batching_off']}x    "
          f"batched / SQL ceiling: {fmt((ratios['batched_over_ceiling'] or 0) * 100, 0)}%    "
          f"batched / COPY limit: {fmt((ratios['batched_over_copy'] or 0) * 100, 0)}%")
    write(json_out, table)


def report_steady(idle_figures, steady, rate, json_out):
    steady["target_rate"] = rate
    steady.update(idle_figures)
    print()
    print(f"idle {steady['idle_seconds']} s after the assignment: CPU {fmt(steady['idle_cpu_percent'], 2)}% of a core, "
          f"RSS {steady['idle_rss_mib']} MiB")
    print(f"steady {rate} events/s: {steady['records']:,} records, end to end (produced to durable) "
          f"p50 {fmt(steady['e2e_p50_ms'])} ms, p99 {fmt(steady['e2e_p99_ms'])} ms; consume to durable "
          f"p50 {fmt(steady['p50_ms'])} ms, p99 {fmt(steady['p99_ms'])} ms; peak RSS {steady['peak_rss_mib']} MiB, "
          f"CPU {steady['cpu_seconds']} s")
    write(json_out, {"steady": steady})


def write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"\n[bench] written to {path}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pid", type=int)
    p.add_argument("--metrics")
    p.add_argument("--until", type=int)
    p.add_argument("--ceiling-sql")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--report", nargs=4)
    p.add_argument("--copy-csv")
    p.add_argument("--ids")
    p.add_argument("--report-steady", nargs=2, metavar=("IDLE", "STEADY"))
    p.add_argument("--idle", type=int, metavar="SECONDS")
    p.add_argument("--rate", type=int)
    p.add_argument("--json")
    a = p.parse_args()
    if a.pid and a.idle is not None:
        print(json.dumps(idle(a.pid, a.metrics, a.idle)))
    elif a.pid:
        print(json.dumps(watch(a.pid, a.metrics, a.until)))
    elif a.ceiling_sql:
        print(ceiling_sql(a.ceiling_sql, a.batch))
    elif a.copy_csv:
        print(copy_csv(a.copy_csv, a.ids))
    elif a.report:
        report(*(json.loads(x) for x in a.report), a.json)
    elif a.report_steady:
        report_steady(*(json.loads(x) for x in a.report_steady), a.rate, a.json)
    else:
        p.error("nothing to do")


if __name__ == "__main__":
    main()
