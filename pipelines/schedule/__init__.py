"""pipelines/schedule/: pipelines run on a schedule (APScheduler), each as a `labbook run` process.

Owns: the schedule store and the scheduler service (schedule.py), what a cron expression means
(cron.py: crontab(5)'s rules), crontab/systemd export (schedule_export.py). May import:
`pipelines/specs/`, `pipelines/tracking/`. It starts runs as processes, not by import.
"""
