#!/bin/sh
# Demo pre/post script. pre: pause the writer. post: record the image's SHA-256 for this point, resume.
# Environment from the agent: LIFEBOAT_PHASE, LIFEBOAT_POINT_ID; from the demo: DEMO_CTL, DEMO_IMAGE.
set -eu
case "$LIFEBOAT_PHASE" in
pre)
    touch "$DEMO_CTL/pause"
    i=0
    while [ ! -e "$DEMO_CTL/paused" ]; do
        i=$((i + 1)); [ $i -lt 1000 ] || { echo "writer did not pause" >&2; exit 1; }
        sleep 0.01
    done ;;
post)
    mkdir -p "$DEMO_CTL/oracle"
    sha256sum "$DEMO_IMAGE" | cut -d' ' -f1 > "$DEMO_CTL/oracle/$LIFEBOAT_POINT_ID.sha256"
    rm -f "$DEMO_CTL/pause" ;;
esac
