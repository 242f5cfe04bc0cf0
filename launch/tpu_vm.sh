#!/usr/bin/env bash
# Cloud TPU VM slice: create it, install dvp_jax on every worker, run one command on all
# workers (one JAX process per host), delete it. See launch/README.md.
set -euo pipefail

DVP_PROG=tpu_vm.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$HERE")
# shellcheck source=launch/common.sh source-path=SCRIPTDIR/..
source "$HERE/common.sh"

usage() {
    cat <<'EOF'
Usage: launch/tpu_vm.sh [OPTIONS] SUBCOMMAND... [-- MAIN_ARGS...]

Create a Cloud TPU VM slice, put dvp_jax on every worker, run
`python -m dvp_jax.main --distributed=on --workdir=WORKDIR MAIN_ARGS...` on all workers
at once, delete the slice. MAIN_ARGS (after --) go to dvp_jax.main unchanged: the
config and its overrides, e.g. -- --config=configs/moco.py:vipriors --config.seed=1

Subcommands (several may be given; they run in this order):
  create    gcloud compute tpus tpu-vm create
  setup     copy the project (or clone it from git) to every worker, pick a Python >= 3.11
            (apt-get installs python3.11 if the image has none), make a venv, pip install
            -e '.[tpu]'; with --data-from, also copy the data set to every worker
  run       the training command on all workers (--worker=all)
  logs      follow worker 0's log of a --detach run
  delete    delete the slice: only one that `create` made (it carries the label
            created-by=dvp-jax-tpu-vm); any other needs --force-delete or a yes on a terminal
  all       create, setup, run (and delete with --delete, even when the run fails)

Options (environment variable in brackets, then the default):
  --name NAME              TPU name [TPU_NAME] (dvp)
  --zone ZONE              zone [ZONE, CLOUDSDK_COMPUTE_ZONE] (us-central2-b)
  --project ID             project [PROJECT] (gcloud's configured project)
  --accelerator-type TYPE  slice type [ACCELERATOR_TYPE] (v4-32)
  --version RUNTIME        TPU software version [RUNTIME_VERSION] (from the type:
                           v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                           v5e/v5litepod: v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base)
  --spot                   Spot VM [SPOT=1]
  --preemptible            preemptible VM [PREEMPTIBLE=1]
  --create-arg ARG         extra argument for `tpu-vm create` (repeatable), e.g.
                           --create-arg=--service-account=SA@PROJECT.iam.gserviceaccount.com
  --source copy|git        how the code gets there [SOURCE] (copy: scp this checkout)
  --git-url URL            repository for --source=git [GIT_URL]
  --git-ref REF            branch, tag or commit for --source=git [GIT_REF] (default branch)
  --remote-dir DIR         project folder on the workers, relative to $HOME, no '..'
                           [REMOTE_DIR] (dvp_jax); `setup` replaces only a folder it made
  --remote-venv DIR        venv on the workers, under $HOME [REMOTE_VENV] (dvp_venv)
  --remote-python PY       Python that makes the venv [REMOTE_PYTHON] (first of
                           python3.13 python3.12 python3.11 python3 that is >= 3.11)
  --data-from URL          gs:// folder copied to every worker in `setup` [DATA_FROM]
  --data-to DIR            where it goes, relative to the project folder [DATA_TO]
                           (data/vipriors: what the vipriors presets read)
  --workdir gs://...       the run's workdir [WORKDIR]; must be on GCS: every worker
                           reads and writes the same checkpoints
  --allow-local-workdir    accept a non-GCS workdir (single-host slices only)
  --distributed MODE       --distributed for dvp_jax.main [DISTRIBUTED] (on: JAX finds the
                           slice's workers itself)
  --env NAME[=VALUE]       environment variable for the run on the workers (repeatable);
                           NAME alone takes the value from this shell's environment (use it
                           for secrets: the value is then on no command line). Values are
                           never printed and reach the workers in a private file, not argv
  --detach                 start the run in the background (nohup, log in ~/LOG) and return
                           [DETACH=1]; follow it with `logs`
  --log FILE               log file of a detached run, under $HOME [LOG] (dvp_run.log)
  --delete                 with `all`: delete the slice at the end [DELETE=1]
  --force-delete           `delete` also a slice this script did not create
  --dry-run                print the commands (one a line, quoted) and run nothing [DRY_RUN=1]
  -h, --help               this help

Examples:
  launch/tpu_vm.sh all --spot --accelerator-type=v4-32 --workdir=gs://BUCKET/dvp/moco \
      -- --config=configs/moco.py:vipriors \
         --config.input.source=tfds:imagenet2012 \
         --config.input.data_dir=gs://BUCKET/tensorflow_datasets
  launch/tpu_vm.sh run --workdir=gs://BUCKET/dvp/moco -- --config=configs/moco.py:vipriors
  launch/tpu_vm.sh --dry-run all --delete --workdir=gs://B/w -- --config=configs/moco.py:vipriors
EOF
}

TPU_NAME=${TPU_NAME:-dvp}
ZONE=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-us-central2-b}}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=$(dvp_bool SPOT "${SPOT:-0}")
PREEMPTIBLE=$(dvp_bool PREEMPTIBLE "${PREEMPTIBLE:-0}")
SOURCE=${SOURCE:-copy}
GIT_URL=${GIT_URL:-}
GIT_REF=${GIT_REF:-}
REMOTE_DIR=${REMOTE_DIR:-dvp_jax}
REMOTE_VENV=${REMOTE_VENV:-dvp_venv}
REMOTE_PYTHON=${REMOTE_PYTHON:-}
DATA_FROM=${DATA_FROM:-}
DATA_TO=${DATA_TO:-data/vipriors}
WORKDIR=${WORKDIR:-}
ALLOW_LOCAL_WORKDIR=$(dvp_bool ALLOW_LOCAL_WORKDIR "${ALLOW_LOCAL_WORKDIR:-0}")
DISTRIBUTED=${DISTRIBUTED:-on}
DETACH=$(dvp_bool DETACH "${DETACH:-0}")
LOG=${LOG:-dvp_run.log}
DELETE=$(dvp_bool DELETE "${DELETE:-0}")
DRY_RUN=$(dvp_bool DRY_RUN "${DRY_RUN:-0}")
FORCE_DELETE=0
CREATED_HERE=0  # 1 once this call's `create` succeeded: that slice is ours to delete.
OWNER_LABEL=created-by=dvp-jax-tpu-vm
MARKER=.dvp_jax_tpu_vm  # In a remote project folder this script made (and may replace).
# shellcheck disable=SC2088  # The ~ is for the remote shell.
R_ENV_FILE='~/.dvp_run_env'  # Private (0600) file with the --env values on each worker.
CREATE_ARGS=()
REMOTE_ENV=()
SUBCOMMANDS=()
MAIN_ARGS=()

while (($#)); do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --opt=value -> --opt value
    esac
    case $1 in
        -h | --help) usage; exit 0 ;;
        --name) dvp_need_value "$1" $#; TPU_NAME=$2; shift ;;
        --zone) dvp_need_value "$1" $#; ZONE=$2; shift ;;
        --project) dvp_need_value "$1" $#; PROJECT=$2; shift ;;
        --accelerator-type) dvp_need_value "$1" $#; ACCELERATOR_TYPE=$2; shift ;;
        --version) dvp_need_value "$1" $#; RUNTIME_VERSION=$2; shift ;;
        --spot) SPOT=1 ;;
        --preemptible) PREEMPTIBLE=1 ;;
        --create-arg) dvp_need_value "$1" $#; CREATE_ARGS+=("$2"); shift ;;
        --source) dvp_need_value "$1" $#; SOURCE=$2; shift ;;
        --git-url) dvp_need_value "$1" $#; GIT_URL=$2; shift ;;
        --git-ref) dvp_need_value "$1" $#; GIT_REF=$2; shift ;;
        --remote-dir) dvp_need_value "$1" $#; REMOTE_DIR=$2; shift ;;
        --remote-venv) dvp_need_value "$1" $#; REMOTE_VENV=$2; shift ;;
        --remote-python) dvp_need_value "$1" $#; REMOTE_PYTHON=$2; shift ;;
        --data-from) dvp_need_value "$1" $#; DATA_FROM=$2; shift ;;
        --data-to) dvp_need_value "$1" $#; DATA_TO=$2; shift ;;
        --workdir) dvp_need_value "$1" $#; WORKDIR=$2; shift ;;
        --allow-local-workdir) ALLOW_LOCAL_WORKDIR=1 ;;
        --distributed) dvp_need_value "$1" $#; DISTRIBUTED=$2; shift ;;
        --env) dvp_need_value "$1" $#; REMOTE_ENV+=("$2"); shift ;;
        --detach) DETACH=1 ;;
        --log) dvp_need_value "$1" $#; LOG=$2; shift ;;
        --delete) DELETE=1 ;;
        --force-delete) FORCE_DELETE=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --) shift; MAIN_ARGS=("$@"); break ;;
        -*) dvp_die "unknown option: $1" ;;
        create | setup | run | logs | delete) SUBCOMMANDS+=("$1") ;;
        all) SUBCOMMANDS+=(create setup run) ;;
        *) dvp_die "unknown subcommand: $1 (create, setup, run, logs, delete, all)" ;;
    esac
    shift
done
export DRY_RUN
((${#SUBCOMMANDS[@]})) || dvp_die "no subcommand (create, setup, run, logs, delete, all)"

# ------------------------------------------------------------------------------- checks
case $SOURCE in
    copy) ;;
    git) [[ -n $GIT_URL ]] || dvp_die "--source=git needs --git-url" ;;
    *) dvp_die "--source must be copy or git, not '$SOURCE'" ;;
esac
case $DISTRIBUTED in
    auto | on | off) ;;
    *) dvp_die "--distributed must be auto, on or off, not '$DISTRIBUTED'" ;;
esac
# Remote paths are written into remote shell commands unquoted (so that ~ expands).
# The project folder is deleted by `setup`: it must stay under $HOME.
for pair in "remote-dir:$REMOTE_DIR" "data-to:$DATA_TO"; do
    if [[ ${pair#*:} == /* || /${pair#*:}/ == */../* || /${pair#*:}/ =~ /\.?/ ]]; then
        dvp_die "--${pair%%:*} '${pair#*:}' must be a relative path under \$HOME without '.', '..' or empty parts"
    fi
done
for pair in "remote-dir:$REMOTE_DIR" "remote-venv:$REMOTE_VENV" "log:$LOG" "data-to:$DATA_TO" \
    "remote-python:${REMOTE_PYTHON:-python3}"; do
    [[ ${pair#*:} =~ ^[A-Za-z0-9_./-]+$ ]] ||
        dvp_die "--${pair%%:*} '${pair#*:}' may hold only letters, digits and _ . / -"
done
for kv in "${REMOTE_ENV[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*(=|$) ]] || dvp_die "--env wants NAME=VALUE or NAME, not '${kv%%=*}=...'"
    if [[ $kv != *=* && -z ${!kv+set} ]]; then
        dvp_die "--env $kv: $kv is not set in this shell's environment"
    fi
done
for word in "$GIT_URL" "$GIT_REF"; do
    [[ $word != -* ]] || dvp_die "--git-url / --git-ref must not start with '-'"
done
if [[ -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
        v6e*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
        v5p*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
        v5e* | v5litepod*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
        *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    esac
fi
if ((SPOT && PREEMPTIBLE)); then
    dvp_die "--spot and --preemptible exclude each other"
fi

# ------------------------------------------------------------------------------- helpers
remote_path() {  # $HOME-relative or absolute path, for a remote shell command
    # shellcheck disable=SC2088  # The ~ is for the remote shell.
    if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '~/%s' "$1"; fi
}
R_DIR=$(remote_path "$REMOTE_DIR")
R_VENV=$(remote_path "$REMOTE_VENV")
R_LOG=$(remote_path "$LOG")

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

on_workers() {  # on_workers WORKER REMOTE_COMMAND
    dvp_run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------- subcommands
do_create() {
    local cmd=("${GCLOUD_TPU[@]}" create "$TPU_NAME" "${LOCATION[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    ((SPOT)) && cmd+=(--spot)
    ((PREEMPTIBLE)) && cmd+=(--preemptible)
    dvp_run "${cmd[@]}" --labels="$OWNER_LABEL" "${CREATE_ARGS[@]}"
    CREATED_HERE=1
}

# A remote shell snippet that deletes folder $1, unless it exists without our marker (was not
# made by this script): then it stops, deleting nothing. Whoever recreates it adds the marker.
remove_own_dir() {
    printf 'if [ -e %s ] && [ ! -e %s/%s ]; then echo "%s: refusing to delete %s: not made by tpu_vm.sh (no %s in it); choose another --remote-dir" >&2; exit 1; fi; rm -rf %s' \
        "$1" "$1" "$MARKER" "$DVP_PROG" "$1" "$MARKER" "$1"
}

do_setup() {
    if [[ $SOURCE == copy ]]; then
        # The source only (no runs/, .git, venvs): what `pip install -e .` and the configs need.
        local paths=() p
        for p in setup.py README.md pyproject.toml dvp_jax configs launch; do
            [[ -e $REPO_ROOT/$p ]] && paths+=("$REPO_ROOT/$p")
        done
        on_workers all "$(remove_own_dir "$R_DIR") && mkdir -p $R_DIR && touch $R_DIR/$MARKER"
        dvp_run "${GCLOUD_TPU[@]}" scp --recurse "${paths[@]}" "$TPU_NAME:$REMOTE_DIR" \
            "${LOCATION[@]}" --worker=all
    else
        local checkout=''
        [[ -n $GIT_REF ]] && checkout=" && git -C $R_DIR checkout $(dvp_quote "$GIT_REF") --"
        on_workers all "$(remove_own_dir "$R_DIR") && git clone -- $(dvp_quote "$GIT_URL") $R_DIR && touch $R_DIR/$MARKER$checkout"
    fi
    local pick_python
    # shellcheck disable=SC2016  # $c and $PY belong to the remote shell.
    if [[ -n $REMOTE_PYTHON ]]; then
        pick_python="PY=$REMOTE_PYTHON"
    else
        # jax >= 0.7 needs Python >= 3.11; Ubuntu 22.04 images ship 3.10.
        pick_python='PY=; for c in python3.13 python3.12 python3.11 python3; do'
        pick_python+=' if command -v $c >/dev/null && $c -c "import sys; sys.exit(sys.version_info < (3, 11))"'
        pick_python+=' && $c -c "import ensurepip" 2>/dev/null; then PY=$c; break; fi; done;'
        pick_python+=' if [ -z "$PY" ]; then sudo apt-get update -qq'
        pick_python+=' && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv'
        pick_python+=' && PY=python3.11; fi'
    fi
    on_workers all "set -e; $pick_python; cd $R_DIR; [ -x $R_VENV/bin/python ] || \$PY -m venv $R_VENV; $R_VENV/bin/python -m pip install -q --upgrade pip; $R_VENV/bin/python -m pip install -e '.[tpu]'"
    if [[ -n $DATA_FROM ]]; then
        on_workers all "mkdir -p $R_DIR/$DATA_TO && gcloud storage rsync --recursive $(dvp_quote "$DATA_FROM") $R_DIR/$DATA_TO"
    fi
}

check_run_args() {
    dvp_check_main_args "${MAIN_ARGS[@]}"
    local workdir=$WORKDIR
    if [[ -z $workdir ]]; then
        workdir=$(dvp_flag_value workdir "${MAIN_ARGS[@]}") ||
            dvp_die "no workdir: pass --workdir=gs://BUCKET/PATH"
    fi
    if [[ $workdir != gs://* ]] && ((!ALLOW_LOCAL_WORKDIR)); then
        dvp_die "--workdir '$workdir' is not on GCS: every worker of a slice must see the same checkpoints (use gs://BUCKET/PATH, or --allow-local-workdir on a single-host slice)"
    fi
}

# write_env_file FILE: `export NAME=VALUE` lines of the --env variables (xtrace off: the
# values must not reach a shell trace).
write_env_file() {
    local xtrace=${-//[^x]/} kv name
    { set +x; } 2>/dev/null
    (
        umask 077
        : > "$1"
        for kv in "${REMOTE_ENV[@]}"; do
            name=${kv%%=*}
            if [[ $kv == *=* ]]; then
                printf 'export %s=%s\n' "$name" "$(dvp_quote "${kv#*=}")" >> "$1"
            else
                printf 'export %s=%s\n' "$name" "$(dvp_quote "${!name}")" >> "$1"
            fi
        done
    )
    if [[ -n $xtrace ]]; then set -x; fi
}

# send_env_file: copies the --env values to every worker in a private file (never in argv).
send_env_file() {
    local names=() kv
    for kv in "${REMOTE_ENV[@]}"; do names+=("${kv%%=*}"); done
    if [[ $DRY_RUN == 1 ]]; then
        dvp_comment "ENV_FILE: a private temporary file with ${names[*]} (values not shown)"
        dvp_run "${GCLOUD_TPU[@]}" scp ENV_FILE "$TPU_NAME:${R_ENV_FILE#\~/}" "${LOCATION[@]}" --worker=all
        return
    fi
    local file
    file=$(mktemp "${TMPDIR:-/tmp}/dvp_env.XXXXXX")
    write_env_file "$file"
    local rc=0
    dvp_run "${GCLOUD_TPU[@]}" scp "$file" "$TPU_NAME:${R_ENV_FILE#\~/}" "${LOCATION[@]}" --worker=all || rc=$?
    rm -f "$file"
    return "$rc"
}

do_run() {
    local main=(-m dvp_jax.main --distributed="$DISTRIBUTED")
    if [[ -n $WORKDIR ]]; then main+=(--workdir="$WORKDIR"); fi
    main+=("${MAIN_ARGS[@]}")
    # Every word quoted for the remote shell, except the $HOME-relative paths (for ~).
    local env_prefix='' remote
    if ((${#REMOTE_ENV[@]})); then
        send_env_file
        env_prefix="chmod 600 $R_ENV_FILE && set -a && . $R_ENV_FILE && set +a && rm -f $R_ENV_FILE && "
    fi
    remote="$R_VENV/bin/python $(dvp_quote "${main[@]}")"
    if ((DETACH)); then
        remote="nohup $remote > $R_LOG 2>&1 < /dev/null &"
    fi
    on_workers all "cd $R_DIR && $env_prefix$remote"
    if ((DETACH)) && [[ $DRY_RUN != 1 ]]; then
        dvp_log "started in the background; follow it with: $0 logs --name=$TPU_NAME --zone=$ZONE"
    fi
}

do_logs() {
    on_workers 0 "tail -n 200 -F $R_LOG"
}

# owned_slice: whether the slice carries the label `create` gives it.
owned_slice() {
    local labels
    labels=$("${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}" \
        --format='value(labels.created-by)' 2>/dev/null) || return 1
    [[ $labels == "${OWNER_LABEL#*=}" ]]
}

do_delete() {
    if ((!CREATED_HERE && !FORCE_DELETE)); then
        if [[ $DRY_RUN == 1 ]]; then
            dvp_log "delete: only if slice $TPU_NAME carries the label $OWNER_LABEL (made by create), else it asks"
        elif ! owned_slice; then
            local answer=''
            if [[ -t 0 ]]; then
                read -r -p "Slice $TPU_NAME was not created by tpu_vm.sh (no label $OWNER_LABEL). Delete it anyway? [y/N] " answer
            fi
            if [[ $answer != [yY]* ]]; then
                printf '%s: error: not deleting slice %s: it was not created by tpu_vm.sh (no label %s); pass --force-delete if it is yours\n' \
                    "$DVP_PROG" "$TPU_NAME" "$OWNER_LABEL" >&2
                return 2
            fi
        fi
    fi
    dvp_run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet
}

# ------------------------------------------------------------------------------------ main
# The steps in their fixed order; `delete` (a subcommand, or --delete with run) comes last
# and, once the slice exists, also runs when a step fails or the script is interrupted.
STEPS=()
WANT_DELETE=0
for step in create setup run logs; do
    if [[ " ${SUBCOMMANDS[*]} " == *" $step "* ]]; then STEPS+=("$step"); fi
done
if [[ " ${SUBCOMMANDS[*]} " == *" delete "* ]]; then WANT_DELETE=1; fi
if ((DELETE)) && [[ " ${STEPS[*]} " == *" run "* ]]; then WANT_DELETE=1; fi
if [[ " ${STEPS[*]} " == *" run "* ]]; then
    check_run_args  # Fail before creating anything.
    if ((WANT_DELETE && DETACH)); then
        dvp_die "--detach returns at once: deleting the slice then would kill the run"
    fi
fi

on_exit() {
    local rc=$?
    trap - EXIT
    local deleted=0
    do_delete || deleted=$?
    rc=$((rc ? rc : deleted))
    exit "$rc"
}
arm_delete() {
    if ((WANT_DELETE)); then trap on_exit EXIT; fi
}

# Armed once the slice exists: after `create` succeeds (a failed create never deletes: the
# name may be someone else's slice), or from the start when this call creates nothing.
if [[ " ${STEPS[*]} " != *" create "* ]]; then arm_delete; fi
for step in "${STEPS[@]}"; do
    "do_$step"
    if [[ $step == create ]]; then arm_delete; fi
done
