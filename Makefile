# vmpool: set-up, tests and the demo. Everything runs on this machine (loopback only).
#   make demo   - run a burst of jobs through vmpool on the bundled local cloud
#   make test   - lint, type checks and the whole test suite
PY ?= python3
VENV = .venv
CLOUD_VENV = .cloud-venv
PYTEST_ARGS ?=
# Most of the suite waits on boots, SSH and jobs, not on the CPU: three workers, each with its own
# test bed. Tests that share this machine's users and home directories (the Torque node's, the
# Slurm node's) or fixed addresses keep to one worker each (xdist_group marks).
PYTEST_WORKERS ?= -n 3 --dist loadgroup

.PHONY: venv system-deps lint test unit demo bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The stand-in VMs are real sshd processes; drop faults use iptables.
system-deps:
	@command -v /usr/sbin/sshd >/dev/null && command -v iptables >/dev/null && command -v nsenter >/dev/null \
	  && command -v killall >/dev/null && command -v shellcheck >/dev/null || { \
	  echo "installing openssh-server iptables psmisc procps util-linux shellcheck (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    openssh-server openssh-client iptables psmisc procps util-linux shellcheck slurmctld slurmd slurm-client munge >/dev/null; }

lint: venv system-deps lint-hooks
	$(VENV)/bin/ruff check vmpool.py tests bench
	$(VENV)/bin/mypy vmpool.py

unit: venv
	$(VENV)/bin/pytest -q tests/test_policy.py tests/test_store.py tests/test_config.py

test: venv cloud-venv system-deps lint
	$(VENV)/bin/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

demo: venv cloud-venv system-deps
	$(VENV)/bin/python -m tests.demo

# Each benchmark prints ratios against a baseline measured in the same run and exits 1 when it
# misses its target; make -k bench runs them all regardless.
bench: venv system-deps
	$(VENV)/bin/python bench/bench_fast_path.py
	$(VENV)/bin/python bench/bench_state_size.py
	$(VENV)/bin/python bench/bench_burst.py
	$(VENV)/bin/python bench/bench_probes.py
	$(VENV)/bin/python bench/bench_reconcile_scale.py
	$(VENV)/bin/python bench/bench_cloud.py --baseline "$$(d=$$(mktemp -d) && git show 0c74bed:vmpool.py >$$d/vmpool.py && echo $$d)"
	$(VENV)/bin/python bench/bench_job_start.py

clean:
	rm -rf $(VENV) $(CLOUD_VENV) run *.egg-info

-include tests/cloud/cloud.mk
-include hooks/hooks.mk
-include hooks/slurm/slurm.mk
