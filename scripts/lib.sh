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
