#!/usr/bin/env python3
"""Measuring side of scripts/bench.sh: measures a running worker over a window through /proc and
its /metrics endpoint (idle, a steady rate it drives with the load generator, a catch-up), writes
the SQL and CSV of the ceiling and COPY runs, and prints the tables (and their JSON)."""

import argparse
import json
import os
import statistics
import subprocess
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


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def cpu_seconds(pid):
    """The process's user + system CPU time so far, in seconds (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_figures(pid):
    return int(proc_status(pid)["VmHWM"].split()[0]) / 1024, cpu_seconds(pid)


def rss_now_mib(pid):
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


class Window:
    """One measuring window on the worker: the CPU it used and its peak resident memory between
    start() and stop(), read from /proc alone (reading /proc does not wake the worker). The peak
    is the kernel's VmHWM after resetting it at the start (/proc/PID/clear_refs), or, where that
    is refused, the highest VmRSS of the samples taken with sample()."""

    def __init__(self, pid):
        self.pid = pid
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.rss_max = rss_now_mib(pid)
        self.cpu0, self.t0 = cpu_seconds(pid), time.monotonic()

    def sample(self):
        self.rss_max = max(self.rss_max, rss_now_mib(self.pid))

    def stop(self):
        self.sample()
        cpu, now = cpu_seconds(self.pid), time.monotonic()
        peak = proc_figures(self.pid)[0] if self.hwm_reset else self.rss_max
        return {
            "window_seconds": round(now - self.t0, 3),
            "cpu_seconds": round(cpu - self.cpu0, 3),
            "cpu_percent": round((cpu - self.cpu0) / (now - self.t0) * 100, 3),
            "rss_peak_mib": round(peak, 1),
            "rss_end_mib": round(rss_now_mib(self.pid), 1),
        }


def wait_ready(addr):
    """Waits until the worker says ready (its group has assigned it the partitions)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://{addr}/readyz", timeout=5).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"bench: the worker at {addr} was not ready within 120 s")
        time.sleep(0.2)


def idle(pid, addr, seconds):
    """Waits until the worker is ready, then measures it over `seconds` with no traffic and no
    request to it: CPU as a share of one core, peak RSS."""
    wait_ready(addr)
    time.sleep(2)
    print(f"[bench] ready; measuring {seconds} s idle", file=sys.stderr)
    window = Window(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(1.0, max(end - time.monotonic(), 0)))
        window.sample()
    figures = window.stop()
    figures["records"] = 0
    return figures


def delta(after, before):
    """The counters and histogram series of `after` minus those of `before`: what one window added."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def wait_for_ledger(path, proc):
    """The number of records the load generator will send, from its ledger (written before it
    sends anything)."""
    while True:
        try:
            return json.load(open(path))["records"]
        except (OSError, ValueError, KeyError):
            if proc.poll() is not None:
                sys.exit(f"bench: the load generator exited with {proc.returncode} before writing {path}")
            time.sleep(0.1)


def steady(pid, addr, rate, ledger, logs, command):
    """Runs the load generator (`command`, which publishes at `rate` and writes `ledger`) and
    measures the worker from its start until every record it sent has reached an end. The worker's
    /metrics is read at the window's start, then not again until the load generator has exited
    (every record delivered), then every 100 ms until the last end: its HTTP threads stay out of
    the CPU figure. Latencies come from the histograms' growth over the window alone."""
    before = scrape(addr)
    count0 = total(before, "booking_worker_events_total")
    if os.path.exists(ledger):
        os.remove(ledger)
    window = Window(pid)
    with open(logs + ".json", "w") as out, open(logs + ".log", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err)
    records = wait_for_ledger(ledger, proc)
    while proc.poll() is None:
        time.sleep(1)
        window.sample()
    if proc.returncode != 0:
        sys.exit(f"bench: the load generator failed ({proc.returncode}); see {logs}.log")
    last_count, last_change = -1, time.monotonic()
    while True:
        m = scrape(addr)
        count = total(m, "booking_worker_events_total") - count0
        if count >= records:
            break
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > 120:
            sys.exit(f"bench: no progress for 120 s at {int(count)} of {records} records")
        time.sleep(0.1)
    figures = window.stop()
    grown = delta(m, before)
    linger = command[command.index("--linger-ms") + 1] if "--linger-ms" in command else None
    figures.update({
        "target_rate": rate,
        "producer_linger_ms": None if linger is None else int(linger),
        "records": int(count),
        "events_per_second": round(count / figures["window_seconds"], 1),
        "p50_ms": quantile(grown, 0.50),
        "p99_ms": quantile(grown, 0.99),
        "e2e_p50_ms": quantile(grown, 0.50, "booking_worker_end_to_end_seconds"),
        "e2e_p99_ms": quantile(grown, 0.99, "booking_worker_end_to_end_seconds"),
        "transactions": int(total(grown, "booking_worker_db_transactions_total", result="committed")),
    })
    return figures


def watch(pid, addr, until):
    """Follows a catch-up through /metrics every 50 ms until `until` records have reached an end:
    the rate from the first end to the last, the latency histograms, the process's peak RSS
    (VmHWM since its start), its CPU time since its start, and its CPU as a share of one core from
    the first end to the last."""
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
            first, cpu_first = now, cpu_seconds(pid)
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
        "cpu_percent": round((cpu - cpu_first) / max(done - first, 1e-9) * 100, 1),
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


# The columns of the regimes' table: header, width, the figure's key in a row, digits.
COLUMNS = [
    ("window s", 11, "window_seconds", 1),
    ("records", 16, "records", 0),
    ("CPU %core", 13, "cpu_percent", 2),
    ("RSS MiB", 11, "rss_peak_mib", 1),
    ("e2e p50", 12, "e2e_p50_ms", 1),
    ("e2e p99", 14, "e2e_p99_ms", 1),
    ("c2d p50", 12, "p50_ms", 1),
    ("c2d p99", 12, "p99_ms", 1),
    ("events/s", 16, "events_per_second", 0),
    ("%COPY", 8, "copy_percent", 0),
]

LEGEND = """\
window s   the regime's measuring window: idle, a fixed time once the group has assigned the worker;
           steady, from the load generator's start to the last record's end; catch-up, from the
           first record's end to the last
CPU %core  the worker's user + system CPU time over the window (/proc/PID/stat at its start and its
           end) divided by the window's length: 100 is one core busy. Idle and steady windows read
           /metrics only at their ends, so the HTTP threads' own CPU stays out; the catch-up reads it
           every 50 ms
RSS MiB    peak resident memory within the window (VmHWM, reset at the window's start); catch-up:
           VmHWM since the process started
e2e        ms from the record's Kafka timestamp (the producer's create time) to its end being
           durable in PostgreSQL; c2d: from the partition thread taking the record to durable.
           Percentiles of the histograms' growth over the window, interpolated within a bucket
events/s   records that reached an end, over the window (steady: the rate achieved)
%COPY      catch-up events/s as a share of the COPY limit's rows/s: the same rows, one COPY in one
           transaction, every index in place, on a fresh database of the same run"""


def regime_rows(run):
    """The table's rows of one run, as (name, figures)."""
    rows = []
    if run.get("idle"):
        rows.append(("idle", run["idle"]))
    for s in run.get("steady", []):
        rows.append((f"steady {s['target_rate']:,}/s", s))
    catchup, copy = run.get("catchup"), run.get("copy")
    if catchup:
        c = dict(catchup, window_seconds=catchup["seconds"], rss_peak_mib=catchup["peak_rss_mib"],
                 events_per_second=catchup["records"] / catchup["seconds"], e2e_p50_ms=None, e2e_p99_ms=None)
        if copy:
            copy_rate = copy["records"] / copy["seconds"]
            c["copy_percent"] = c["events_per_second"] / copy_rate * 100
            rows.append(("catch-up", c))
            rows.append(("COPY limit", {"window_seconds": copy["seconds"], "records": copy["records"],
                                        "events_per_second": copy_rate}))
        else:
            rows.append(("catch-up", c))
    return rows


def cells(values, digits):
    """One figure, or over several runs its median and, for the line below, its range."""
    values = [v for v in values if v is not None]
    if not values:
        return "-", ""
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}", ""
    low, high = min(values), max(values)
    return f"{statistics.median(values):,.{digits}f}", f"{low:,.{digits}f}-{high:,.{digits}f}"


def provenance():
    """When and what was measured: the UTC time, the commit, and whether the tree had changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty=+changes", "--abbrev=10"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return when, commit


def report_regimes(runs, json_out):
    """Prints one table of every regime: a row per regime, a column per figure, each cell the
    median and range of the runs when there are several."""
    when, commit = provenance()
    names = [name for name, _ in regime_rows(runs[0])]
    by_name = {name: [] for name in names}
    for run in runs:
        for name, figures in regime_rows(run):
            by_name.setdefault(name, []).append(figures)
    wide = len(runs) > 1
    print()
    print(f"booking-worker bench, {when}, commit {commit}, {os.cpu_count()} cores, {len(runs)} run"
          + ("s: each cell is the median of the runs, their range below it" if wide else ""))
    print("the worker with its default settings; broker, PostgreSQL, load generator and worker on this machine")
    lingers = sorted({s.get("producer_linger_ms") for run in runs for s in run.get("steady", [])}, key=str)
    if lingers:
        print("the steady load generator's linger.ms: " + ", ".join("5 (its default)" if v is None else str(v)
                                                                   for v in lingers))
    print()
    print(f"{'regime':<16}" + "".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS))
    for name in names:
        pairs = [cells([f.get(key) for f in by_name[name]], digits) for _, _, key, digits in COLUMNS]
        print(f"{name:<16}" + "".join(f"{m:>{w}}" for (m, _), (_, w, _, _) in zip(pairs, COLUMNS)))
        if wide:
            print(f"{'':<16}" + "".join(f"{r:>{w}}" for (_, r), (_, w, _, _) in zip(pairs, COLUMNS)))
    print()
    print(LEGEND)
    write(json_out, {"measured": when, "commit": commit, "runs": runs})


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
    p.add_argument("--report-regimes", metavar="RUNS_JSONL")
    p.add_argument("--idle", type=int, metavar="SECONDS")
    p.add_argument("--steady", type=int, metavar="RATE")
    p.add_argument("--ledger")
    p.add_argument("--logs")
    p.add_argument("command", nargs="*", help="after --: the load generator's command line (--steady)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.pid and a.idle is not None:
        print(json.dumps(idle(a.pid, a.metrics, a.idle)))
    elif a.pid and a.steady:
        print(json.dumps(steady(a.pid, a.metrics, a.steady, a.ledger, a.logs, a.command)))
    elif a.pid:
        print(json.dumps(watch(a.pid, a.metrics, a.until)))
    elif a.ceiling_sql:
        print(ceiling_sql(a.ceiling_sql, a.batch))
    elif a.copy_csv:
        print(copy_csv(a.copy_csv, a.ids))
    elif a.report:
        report(*(json.loads(x) for x in a.report), a.json)
    elif a.report_regimes:
        with open(a.report_regimes) as f:
            report_regimes([json.loads(line) for line in f if line.strip()], a.json)
    else:
        p.error("nothing to do")


if __name__ == "__main__":
    main()
