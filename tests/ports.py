"""Free loopback ports for tests that start servers or distributed ranks."""

import socket


def free_ports(n: int = 1) -> int:
    """A port P with P .. P+n-1 all free now (mlx.launch's ring gives rank r the port P + r).
    Free now only: a caller that loses one to another process in between retries with a new P."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        socks = []
        try:
            for k in range(1, n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", start + k))
            return start
        except OSError:
            continue
        finally:
            for x in socks:
                x.close()
    raise RuntimeError("no run of free ports on loopback")
