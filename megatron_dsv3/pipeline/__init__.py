"""Pipeline schedules (DeepSeek-V3 section 3.2.1): op lists per rank (schedule.py) and their simulator (simulate.py)."""
