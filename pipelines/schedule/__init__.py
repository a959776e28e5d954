"""pipelines/schedule/: pipelines run on a schedule (APScheduler), each as a `labbook run` process.

Owns: the schedule store, the scheduler service, crontab/systemd export (schedule.py). May
import: `pipelines/specs/`, `pipelines/tracking/`. It starts runs as processes, not by import.
"""
