# Helpers shared by the shell scripts (sourced, not run).

# Prints the script's header comment (its usage) when its arguments ask for help; the
# caller exits then: `usage_if_asked "$0" "$@" && exit 0`.
usage_if_asked() {
    local script="$1"
    shift
    local arg
    for arg in "$@"; do
        if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
            sed -n '2,/^[^#]/p' "$script" | sed -n 's/^# \{0,1\}//p'
            return 0
        fi
    done
    return 1
}

# An absolute path for a path argument that exists relative to the caller's folder, so that
# it still names the same file after the script changes to the repository; else the argument
# (the keywords latest and best stay keywords).
absolute_if_path() {
    if [[ "$1" != /* && "$1" != latest && "$1" != best && -e "$1" ]]; then
        printf '%s/%s\n' "$(pwd -P)" "$1"
    else
        printf '%s\n' "$1"
    fi
}

# The setting $3 (SECTION.KEY, e.g. logging.out_dir) of the config $2 under the `capsnet train`
# arguments that follow (-o KEY=VALUE, -oKEY=VALUE, --override KEY=VALUE, --override=KEY=VALUE),
# read with the python $1.
config_setting() {
    "$1" - "${@:2}" <<'PY'
import sys
from capsnet.config import load_config
args, overrides = sys.argv[3:], []
for i, arg in enumerate(args):
    if arg in ("-o", "--override") and i + 1 < len(args):
        overrides.append(args[i + 1])
    elif arg.startswith("--override="):
        overrides.append(arg.split("=", 1)[1])
    elif arg.startswith("-o") and len(arg) > 2:  # -oKEY=VALUE
        overrides.append(arg[2:])
section, key = sys.argv[2].split(".")
print(getattr(getattr(load_config(sys.argv[1], overrides), section), key))
PY
}

# logging.out_dir of the config $2 under the `capsnet train` arguments that follow, read with
# the python $1 (as config_setting).
config_out_dir() {
    config_setting "$1" "$2" logging.out_dir "${@:3}"
}

# The arguments of `capsnet train` with the paths that follow --config/-c/--resume made
# absolute; the result is left in the array ABS_ARGS.
absolute_path_options() {
    ABS_ARGS=()
    local expect_path=0 arg
    for arg in "$@"; do
        if ((expect_path)); then
            ABS_ARGS+=("$(absolute_if_path "$arg")")
            expect_path=0
        elif [[ "$arg" == "--config" || "$arg" == "-c" || "$arg" == "--resume" ]]; then
            ABS_ARGS+=("$arg")
            expect_path=1
        elif [[ "$arg" == --config=* || "$arg" == --resume=* ]]; then
            ABS_ARGS+=("${arg%%=*}=$(absolute_if_path "${arg#*=}")")
        else
            ABS_ARGS+=("$arg")
        fi
    done
}
