#!/bin/sh
# Entry point of the stream-detector image: picks the program from the first argument.
#
#   worker [ARGS...]   the streaming worker: python -m stream_detector run ARGS...
#   trainer ARGS...    the trainer CLI:      python -m trainer ARGS...
#   alertmanager       the Alertmanager bridge: python -m stream_detector alertmanager ARGS...
#   anything else      run as given (a shell, python, a one-off script)
#
# Each program is exec'd so that it is PID 1 and receives SIGTERM from the kubelet directly:
# the worker drains its batch on SIGTERM.
set -eu

if [ "$#" -eq 0 ]; then
    set -- worker
fi

case "$1" in
    worker)
        shift
        exec python -m stream_detector run "$@"
        ;;
    trainer)
        shift
        exec python -m trainer "$@"
        ;;
    alertmanager)
        shift
        exec python -m stream_detector alertmanager "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
