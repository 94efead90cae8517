"""The SLA planner: a pure core (core.py) decides role switches from observations; the runner
(runner.py) observes the cluster from the router, holds the leader lease and applies them."""
