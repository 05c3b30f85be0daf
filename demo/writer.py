"""Demo workload: keeps writing to a disk image; pauses on request so a point is crash-consistent.

The pre script asks for a pause (creates <ctl>/pause) and waits for <ctl>/paused; the post
script records the image's SHA-256 as the oracle of that point and removes the pause file.
"""

import os
import random
import sys
import time

image, ctl = sys.argv[1], sys.argv[2]
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
fd = os.open(image, os.O_RDWR)
size = os.lseek(fd, 0, os.SEEK_END)  # an image file or a block device
pause, paused = os.path.join(ctl, "pause"), os.path.join(ctl, "paused")
words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ".split()
while not os.path.exists(os.path.join(ctl, "stop")):
    if os.path.exists(pause):
        open(paused, "w").close()
        while os.path.exists(pause):
            time.sleep(0.01)
        os.unlink(paused)
        continue
    n = rng.choice([4096, 16384, 65536, 262144])
    off = rng.randrange(0, size - n) // 4096 * 4096
    kind = rng.random()
    if kind < 0.4:
        data = b" ".join(rng.choice(words) for _ in range(n // 4))[:n].ljust(n, b".")
    elif kind < 0.8:
        data = rng.randbytes(n)
    else:
        data = bytes(n)
    os.pwrite(fd, data, off)
    time.sleep(0.002)
