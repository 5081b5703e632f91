"""What handing one job to a worker process costs the process that hands it out.

    python3 benchmarks/dispatch.py [N]

Runs N no-op jobs (default 3000) through a ``ProcessPoolExecutor`` with 2 workers and
through 2 worker processes fed by a socket each (what ``node/pipeline.py`` does), one
job at a time (as when the workers keep up with a single sender) and all queued at
once. Prints the CPU time of this process per job: that time is taken from the
node's receiving thread.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready

JOB = ("/spool/incoming/000001.dcm", b"x" * 845)  # a path and a config's size
Run = Callable[[int], None]


def noop(job: tuple[str, bytes]) -> str:
    return job[0]


def echo_worker(conn: Connection) -> None:
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(pickle.dumps(noop(pickle.loads(message))))


def per_job_cpu(run: Run, jobs: int) -> float:
    started = time.process_time()
    run(jobs)
    return (time.process_time() - started) / jobs * 1e6


def executor_runs(executor: ProcessPoolExecutor) -> dict[str, Run]:
    def one_at_a_time(jobs: int) -> None:
        for _ in range(jobs):
            executor.submit(noop, JOB).result()

    def queued(jobs: int) -> None:
        wait([executor.submit(noop, JOB) for _ in range(jobs)])

    return {"one at a time": one_at_a_time, "all queued": queued}


def socket_runs(conns: list[Connection]) -> dict[str, Run]:
    message = pickle.dumps(JOB)

    def one_at_a_time(jobs: int) -> None:
        for i in range(jobs):
            conn = conns[i % len(conns)]
            conn.send_bytes(message)
            pickle.loads(conn.recv_bytes())

    def queued(jobs: int) -> None:
        sent = done = 0
        idle = list(conns)
        while done < jobs:
            while idle and sent < jobs:
                idle.pop().send_bytes(message)
                sent += 1
            for conn in wait_ready(conns):
                pickle.loads(conn.recv_bytes())
                done += 1
                idle.append(conn)

    return {"one at a time": one_at_a_time, "all queued": queued}


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(2, mp_context=context)
    for future in [executor.submit(os.getpid) for _ in range(4)]:
        future.result()  # both workers started
    pairs = [context.Pipe() for _ in range(2)]
    workers = [context.Process(target=echo_worker, args=(theirs,)) for _, theirs in pairs]
    for worker in workers:
        worker.start()
    conns = [ours for ours, _ in pairs]
    print("| how | ProcessPoolExecutor µs/job | socket per worker µs/job |")
    print("|---|---|---|")
    for how in ("one at a time", "all queued"):
        pool = per_job_cpu(executor_runs(executor)[how], jobs)
        sockets = per_job_cpu(socket_runs(conns)[how], jobs)
        print(f"| {how} | {pool:.0f} | {sockets:.0f} |")
    executor.shutdown()
    for conn in conns:
        conn.close()
    for worker in workers:
        worker.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
