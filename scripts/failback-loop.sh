#!/usr/bin/env bash
# The failback loop as one command sequence (the same as tests/integration/test_integration_failback_loop.py):
# failover -> commit -> reprotect -> failover back (prepare, switch) -> re-enable. Stops at the first failure.
#
# Needs: the management API ($LIFEBOAT_API, $LIFEBOAT_CA, $LIFEBOAT_CREDENTIAL, as for 'lifeboat status'), a
# running lifeboat-master-target on the on-prem side with the disk registered
# ('lifeboat master-target add-disk --disk MACHINE.DISK --target /dev/... --size N') and this sender's token
# ('lifeboat master-target add-sender').
#   MACHINE=web01 DISK=sda FAILOVER_DIR=/srv/failover MT_URL=https://onprem:9444 MT_CA=ca.pem \
#   MT_TOKEN=sender.token STEP=all scripts/failback-loop.sh
# STEP runs one part: failover | reprotect | failback | reenable | all (failover + commit, then the rest after
# the failed-over machine has run: run 'reprotect' once it has, 'failback' when the move back is planned).
set -euo pipefail

: "${MACHINE:?machine name}" "${DISK:?disk name as in the agent config, e.g. sda}" "${FAILOVER_DIR:?directory}"
: "${MT_URL:?master target URL}" "${MT_CA:?CA of the master target}" "${MT_TOKEN:?sender token file}"
STEP=${STEP:-all}
IMAGE="$FAILOVER_DIR/$MACHINE.$DISK.img"            # where the failover job writes the disk
MT=(--disk "$MACHINE.$DISK" --master-target "$MT_URL" --ca-cert "$MT_CA" --token-file "$MT_TOKEN")

step() { echo "+ lifeboat $*" >&2; lifeboat "$@"; }

if [[ $STEP == failover || $STEP == all ]]; then
    step failover "$MACHINE" --point latest --to "$FAILOVER_DIR"     # the on-prem machine is off from here
    step failover commit "$MACHINE"                                  # the other recovery points go
fi
if [[ $STEP == reprotect || $STEP == all ]]; then
    # The control plane marks the on-prem machine powered off (its agent is refused) and only the
    # blocks that differ from the on-prem disk are sent.
    step reprotect "$MACHINE" --source-image "$IMAGE" "${MT[@]}"
fi
if [[ $STEP == failback || $STEP == all ]]; then
    # Quiesce or stop the failed-over machine first: the final point is what its disk holds now.
    step failback "$MACHINE" --source-image "$IMAGE" --stage prepare "${MT[@]}"   # cancellable: --stage cancel
    step failback "$MACHINE" --stage switch "${MT[@]}"
fi
if [[ $STEP == reenable || $STEP == all ]]; then
    step reenable "$MACHINE"
    echo "now start the agent on $MACHINE (systemctl start lifeboat-mobility): it resyncs by digest" >&2
    step status "$MACHINE"
fi
