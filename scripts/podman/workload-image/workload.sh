# A stand-in customer workload, driven by its environment:
#   MODE=serve (default): listen on each port in LISTEN (default: the published ports the
#     agent names in SWITCHYARD_PORTS), echoing what it reads, after
#     READY_AFTER seconds; exit with EXIT_CODE after EXIT_AFTER seconds if set; on SIGTERM
#     write /checkpoint/step and exit 0.
#   MODE=crash: print a few lines (one quoting API_TOKEN) and exit with code 3.
#   MODE=deaf: run but never listen.
#   MODE=stubborn: listen on LISTEN but ignore SIGTERM (only SIGKILL ends it).
echo "workload starting (mode ${MODE:-serve})"
case "${MODE:-serve}" in
crash)
    echo "loading weights with token ${API_TOKEN}"
    echo "fatal: CUDA out of memory"
    exit 3
    ;;
deaf)
    trap 'exit 0' TERM
    while true; do sleep 1 & wait $!; done
    ;;
esac
if [ "${MODE}" = stubborn ]; then
    trap '' TERM
else
    trap 'echo "checkpoint at $(date -u +%FT%TZ)" > /checkpoint/step; echo "checkpoint written"; exit 0' TERM
fi
sleep "${READY_AFTER:-0}"
for port in ${LISTEN:-${SWITCHYARD_PORTS:-22}}; do
    nc -ll -p "$port" -e cat &
done
echo "listening on ${LISTEN:-${SWITCHYARD_PORTS:-22}}"
started=0
while true; do
    sleep 1 & wait $!
    started=$((started + 1))
    if [ -n "$EXIT_AFTER" ] && [ "$started" -ge "$EXIT_AFTER" ]; then
        echo "giving up after ${started} s"
        exit "${EXIT_CODE:-1}"
    fi
done
