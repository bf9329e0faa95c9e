"""Not a test module: what each rank runs in the distributed tests (`python -m
tests.distributed_worker JOBS_JSON`), as the CLI would: errors become one `sparq: error:` line
and the error's exit code. A job may name a rank that dies (os._exit) in its first table."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    """Runs the jobs of argv[1] (a JSON list) with one process group."""
    import sparqcli
    from sparqcli.distributed.group import ProcessGroup
    from sparqcli.errors import SparqError

    jobs = json.loads(sys.argv[1])
    try:
        group = ProcessGroup.from_environment(timeout_s=float(os.environ.get("TIMEOUT_S", "30")))
        for job in jobs:
            if job.get("die_on_rank") == group.rank:
                import sparqcli.engine.pipeline as pipeline

                def die(*args: object, **kwargs: object) -> None:
                    os._exit(9)

                pipeline.compress_rows = die  # type: ignore[assignment]
                import sparqcli.distributed.runner

            report = sparqcli.compress_distributed(
                job["input"], job["config"], output=job["output"], group=group
            )
            if group.rank == 0 and job.get("report"):
                with open(job["report"], "w") as file:
                    json.dump(report.to_dict(), file)
    except SparqError as error:
        print(f"sparq: error: {error}", file=sys.stderr, flush=True)
        os._exit(error.exit_code)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
